/*
 * The Linux CPU build of MLX links the reference BLAS and calls the standard CBLAS name
 * `cblas_sgemm`. The scipy-openblas32 wheel ships a modern OpenBLAS whose symbols carry a
 * `scipy_` prefix, so it cannot stand in as it is. This file gives the standard name to the
 * prefixed function; loaded with RTLD_GLOBAL before MLX, it routes MLX's float32 matmuls to OpenBLAS.
 */
extern void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                              const float *a, int lda, const float *b, int ldb, float beta, float *c,
                              int ldc);

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

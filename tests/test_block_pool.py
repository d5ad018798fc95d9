import pytest

from semantic_core.agents.prefix_index import PrefixIndex, block_hashes, common_prefix
from semantic_core.engine.block_pool import BlockPool
from semantic_core.errors import PoolExhausted


def test_capacity_comes_from_budget_and_model_geometry():
    # SmolLM2-135M in float32: 30 layers x 2 x 3 heads x 64 dims x 4 bytes = 46,080 bytes per token.
    pool = BlockPool.from_budget(2048, 64, 46_080)
    assert pool.bytes_per_block == 64 * 46_080
    assert pool.capacity == (2048 * 1024 * 1024) // (64 * 46_080) == 728
    assert pool.utilization == 0.0


def test_allocate_release_and_utilization():
    pool = BlockPool(10, 64, 1000)
    a = pool.allocate("a", 4)
    b = pool.allocate("b", 6)
    assert pool.free == 0 and pool.utilization == 1.0
    with pytest.raises(PoolExhausted):
        pool.allocate("c", 1)
    pool.release("a", a)
    assert pool.free == 4 and pool.used == 6
    assert pool.owned_by("b") == (6, 0)
    pool.release("b", b)
    assert pool.used == 0


def test_shared_blocks_are_reference_counted():
    pool = BlockPool(8, 64, 1000)
    parent = pool.allocate("parent", 3)
    pool.share("child", parent[:2])
    assert [pool.refcount(b) for b in parent] == [2, 2, 1]
    assert pool.owned_by("parent") == (1, 2) and pool.owned_by("child") == (0, 2)
    assert pool.stats().shared == 2
    pool.release("parent", parent)
    assert pool.used == 2  # the child still holds the shared prefix
    pool.release("child", parent[:2])
    assert pool.used == 0


def test_release_of_a_block_not_held_is_an_error():
    pool = BlockPool(4, 64, 1000)
    blocks = pool.allocate("a", 1)
    with pytest.raises(ValueError):
        pool.release("b", blocks)


def test_zero_capacity_budget_is_refused_clearly():
    with pytest.raises(PoolExhausted, match="SEMANTIC_MLX_CACHE_BUDGET_MB"):
        BlockPool.from_budget(0.01, 64, 46_080)


def test_blocks_for_rounds_up():
    pool = BlockPool(4, 64, 1)
    assert [pool.blocks_for(n) for n in (0, 1, 64, 65, 128)] == [0, 1, 1, 2, 2]


def test_prefix_index_finds_the_longest_block_prefix():
    idx = PrefixIndex(4)
    idx.set("a", list(range(12)))  # 3 blocks
    idx.set("b", [*range(8), 99, 98, 97, 96])  # shares 2 blocks with a
    depth, ids = idx.candidates(list(range(16)))
    assert depth == 3 and ids == {"a"}
    depth, ids = idx.candidates([*range(8), 50, 51, 52, 53])
    assert depth == 2 and ids == {"a", "b"}
    depth, ids = idx.candidates([1, 2, 3, 4])
    assert depth == 0 and ids == set()
    idx.remove("a")
    assert idx.candidates(list(range(16)))[1] == {"b"}


def test_prefix_index_respects_eligibility():
    idx = PrefixIndex(4)
    idx.set("a", list(range(8)))
    assert idx.candidates(list(range(8)), eligible=["x"]) == (0, set())


def test_chained_hashes_depend_on_everything_before():
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)[1]


def test_common_prefix():
    assert common_prefix(list(range(1000)), [*range(700), -1]) == 700
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2

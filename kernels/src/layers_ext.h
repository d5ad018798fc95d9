// The layer ops (RMS norm, RoPE, attention) join the extension module through this one call.
#pragma once

#include <nanobind/nanobind.h>

void register_layer_ops(nanobind::module_& m);

// The Python module of nibble's CPU kernels (kernels/native.py builds and loads it). Each call
// releases the GIL while it computes, as PyTorch's own ops do, so that the server's event loop
// can stream tokens while the engine thread is inside a kernel.
#include "nibble_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("int4_linear", &int4_linear, "int4 weights x activations (AVX2, FMA)", release());
  m.def("int8_linear_act8", &int8_linear_act8,
        "int8 weights x activations rounded to int8 per block of 32 (AVX2)", release());
  m.def("w8a8_linear", &w8a8_linear,
        "int8 weights x activations rounded to int8 per row or per tensor (AVX2)", release());
  m.def("int4_dequantize_t", &int4_dequantize_t, "int4 weights -> float32 W^T", release());
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention of every one-token sequence over the paged KV cache (AVX2, FMA)",
        release());
  m.def("llama_decode", &llama_decode,
        "every decoder layer of a Llama decode step, for int4 layers (AVX2, FMA)", release());
}

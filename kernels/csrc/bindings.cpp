// The Python module of nibble's CPU kernels (kernels/native.py builds and loads it).
#include "nibble_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "int4 weights x activations (AVX2, FMA)");
  m.def("int8_linear_act8", &int8_linear_act8,
        "int8 weights x activations rounded to int8 per block of 32 (AVX2)");
  m.def("int4_dequantize_t", &int4_dequantize_t, "int4 weights -> float32 W^T");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention of every one-token sequence over the paged KV cache (AVX2, FMA)");
  m.def("llama_decode", &llama_decode,
        "every decoder layer of a Llama decode step, for int4 layers (AVX2, FMA)");
}

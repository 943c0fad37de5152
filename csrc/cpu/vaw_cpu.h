// The CPU library's entry points that vaw.cpp names (the kernels register themselves in vaw_cpu.cpp).
#pragma once

#include <string>

#include "../common.h"

namespace varweight {

// The instruction set of the CPU pass: "" asks, "auto" / "scalar" / "avx2" / "avx512" choose (for
// tests and benchmarks: every choice gives bitwise the same result). Returns the one in use.
std::string cpu_isa(std::string request);

}  // namespace varweight

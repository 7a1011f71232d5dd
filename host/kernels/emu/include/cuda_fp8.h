// Stand-in for the CUDA toolkit header when kernels/emu compiles the kernels for the CPU.
#pragma once
#include "../cuda_emu.h"

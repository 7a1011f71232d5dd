//! The CUDA kernels of `host/kernels` run on the CPU emulator of `host/kernels/emu` against
//! plain references, so their index math, barriers, fragment layouts and roundings are
//! tested on every machine, not only in the sessions that are lent a GPU.
//!
//! The kernel sources compile unchanged with the machine's C++ compiler (`$CXX`, else the first
//! of `c++`, `g++`, `clang++`) into one runner binary (`support/kernel_emu.rs`, cached under
//! the target dir by a hash of the sources and flags). Each launch here passes the grid,
//! block, shared memory and arguments the host module passes (named in each test); the runner
//! checks every argument's kind and width against the kernel's parameter, fills outputs with
//! NaN bytes first, and stops on an access before a buffer's page or past its end (to within
//! the 15 bytes that 16-byte alignment leaves after odd sizes).
//!
//! One file per group of kernels under `kernel_emulation/`.

#[path = "support/kernel_emu.rs"]
mod kernel_emu;

#[path = "kernel_emulation/attention.rs"]
mod attention;
#[path = "kernel_emulation/decoder.rs"]
mod decoder;
#[path = "kernel_emulation/fp8.rs"]
mod fp8;
#[path = "kernel_emulation/transformer.rs"]
mod transformer;

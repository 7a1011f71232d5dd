// Runs one kernel of host/kernels on the CPU emulator (cuda_emu.h) and writes its outputs,
// for host/tests/kernel_emulation.rs:
//
//   runner [--schedule forward|reverse|warps-ahead] KERNEL GX GY GZ BX BY BZ SMEM_BYTES ARG...
//
// ARG is what the host pushes for each kernel parameter, in order, and the runner checks it
// against the parameter's type (a wrong kind or width is an error, as it would be a silent
// bug on the GPU):
//   in:PATH            a buffer read from PATH (pointer parameters)
//   out:PATH:BYTES     a buffer of BYTES, filled with 0xff (NaN in bf16, f32 and e4m3), written
//                      to PATH after the launch
//   inout:IN:OUT       read from IN, written to OUT after the launch
//   i32:N u32:N i64:N u64:N f32:X   scalars
// Buffers end at a PROT_NONE page (and start after one), so a read or write past a buffer's end
// (to within the up to 15 bytes that 16-byte alignment leaves after odd sizes) stops the run
// with the block and thread named.
//
// The schedule decides which thread moves next, which is where a missing barrier shows:
// - forward (the default) and reverse resume every waiting thread once per round, in thread
//   order or its reverse;
// - warps-ahead runs each warp, last to first, as far as it can go before the next warp moves,
//   so a warp overwrites shared memory the others have not read yet unless a barrier stops
//   it (the race of a reduction's scratch reused without a barrier shows only here).
// A kernel whose results depend on the schedule has a race; the tests compare all three.
//
// A new kernel file: include it below in a namespace of its own, list its entry points in
// KERNELS, and give it a test under host/tests/kernel_emulation/ that launches it as its host
// module does (grid, block, shared memory, argument types) against a plain reference. New
// inline PTX goes behind `#ifndef HEADSHOT_EMULATE` in the kernel, with its emulation here.
// cp.async copies land as late as the PTX allows (at the cp.async.wait_group that retires
// them) under forward, and as early (when issued) under the other two: a kernel that reads a
// tile before waiting for it fails the first, one that refills a buffer others still read
// fails the others.

#include "cuda_emu.h"

#include <csignal>
#include <cstdarg>
#include <string>
#include <sys/mman.h>
#include <tuple>
#include <type_traits>
#include <ucontext.h>
#include <unistd.h>
#include <utility>

uint3 threadIdx, blockIdx, blockDim, gridDim;

// The kernels, each in its own namespace (their helpers share names across files).
namespace k_adaln {
#include "../adaln.cu"
}
namespace k_conv_gemm {
#include "../conv_gemm.cu"
}
namespace k_conv_implicit {
#include "../conv_implicit.cu"
}
namespace k_conv_wgmma {
#include "../conv_wgmma.cu"
}
namespace k_flash_attn {
#include "../flash_attn.cu"
}
namespace k_flash_wgmma {
#include "../flash_wgmma.cu"
}
namespace k_fp8_quant {
#include "../fp8_quant.cu"
}
namespace k_group_norm {
#include "../group_norm.cu"
}
namespace k_norm_rope {
#include "../norm_rope.cu"
}

namespace {

const size_t PAGE = (size_t)sysconf(_SC_PAGESIZE);
constexpr size_t STACK_BYTES = 256 * 1024;
constexpr int SLOT_WORDS = 8;

[[noreturn]] void fail_plain(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fputs("kernel emulator: ", stderr);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
    va_end(ap);
    std::exit(3);
}

// A buffer between two PROT_NONE pages, ending (16-byte aligned) as close to the upper one
// as alignment allows.
struct Guarded {
    unsigned char *base = nullptr;
    size_t mapped = 0;
    unsigned char *data = nullptr;
    size_t size = 0;

    explicit Guarded(size_t bytes) : size(bytes) {
        const size_t pages = (bytes + PAGE - 1) / PAGE;
        mapped = (pages + 2) * PAGE;
        void *m = mmap(nullptr, mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            fail_plain("cannot map %zu bytes", mapped);
        }
        base = static_cast<unsigned char *>(m);
        if (pages > 0 && mprotect(base + PAGE, pages * PAGE, PROT_READ | PROT_WRITE) != 0) {
            fail_plain("cannot unprotect %zu bytes", pages * PAGE);
        }
        data = base + PAGE + ((pages * PAGE - bytes) & ~(size_t)15);
    }
    Guarded(const Guarded &) = delete;
    Guarded &operator=(const Guarded &) = delete;
    ~Guarded() { munmap(base, mapped); }
};

struct Copy {
    unsigned char *dst;
    const unsigned char *src;
    int bytes;
};

// One wgmma as a thread issued it: where its accumulators live, its A fragment registers
// (when A comes from registers) and its operands' descriptors.
struct Wgmma {
    float *d;
    int n;
    bool a_in_registers;
    uint32_t a[4];
    const uint32_t *a_registers; // where A lived when issued (compared at retire)
    uint64_t desc_a, desc_b;
    bool accumulate;
    // The operands as shared memory held them at issue (A 64×16 when from shared memory, B
    // n×16), and the accumulators when this op was the first of its group to write them.
    std::vector<float> a_smem, b_smem, d_at_issue;
};

// What a thread issued asynchronously, in the groups cp.async and wgmma both use: the group
// still open, then the committed ones, oldest first (the wait instructions retire from the
// front).
template <class T> struct AsyncGroups {
    std::vector<T> open;
    std::vector<std::vector<T>> pending;

    void commit() {
        pending.push_back(std::move(open));
        open.clear();
    }
    void clear() {
        open.clear();
        pending.clear();
    }
};

struct Fiber {
    ucontext_t ctx;
    unsigned char *stack = nullptr;
    uint3 tid{};
    unsigned linear = 0;
    bool done = false;
    AsyncGroups<Copy> copies;
    AsyncGroups<Wgmma> wgmmas;
    // wgmma.fence seen since this thread last retired wgmma groups (registers may have been
    // written since); shared-memory bytes its landed cp.async copies wrote that no
    // fence.proxy.async of its own has made visible to wgmma yet.
    bool wgmma_fenced = false;
    std::vector<unsigned char *> unfenced_copies;

    // No operation in flight, as at the start of a block (and after the thread exits).
    void reset_async() {
        copies.clear();
        wgmmas.clear();
        wgmma_fenced = false;
        unfenced_copies.clear();
    }
};

struct Barrier {
    unsigned live = 0, arrived = 0;
    uint64_t generation = 0;
};

ucontext_t scheduler;
std::vector<Fiber> fibers;
Fiber *current = nullptr;
Barrier block_barrier;
std::vector<Barrier> warp_barriers;
std::vector<Barrier> group_barriers;                   // one per warpgroup (128 threads)
std::vector<const std::vector<Wgmma> *> group_slots; // each thread's retiring wgmma group
std::vector<uint32_t> warp_slots;
bool progressed = false;
bool eager_copies = false;
// Per byte of dynamic shared memory: 1 + the thread whose cp.async wrote it and has not yet
// fenced it for the async proxy (0: visible to wgmma).
std::vector<uint16_t> generic_writer;
void (*body)(void *) = nullptr;
void *body_arg = nullptr;
Guarded *dynamic_smem = nullptr;

void where(char *out, size_t n) {
    if (current == nullptr) {
        std::snprintf(out, n, "outside any block");
        return;
    }
    std::snprintf(out, n, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y,
                  blockIdx.z, current->tid.x, current->tid.y, current->tid.z);
}

void yield() { swapcontext(&current->ctx, &scheduler); }

void release(Barrier &b) {
    b.arrived = 0;
    b.generation += 1;
    progressed = true;
}

void wait(Barrier &b) {
    progressed = true;
    const uint64_t generation = b.generation;
    if (++b.arrived == b.live) {
        release(b);
        return;
    }
    while (b.generation == generation) {
        yield();
    }
}

void leave(Barrier &b) {
    b.live -= 1;
    if (b.arrived > 0 && b.arrived == b.live) {
        release(b);
    }
}

void trampoline() {
    body(body_arg);
    current->done = true;
    current->reset_async();
    progressed = true;
    leave(block_barrier);
    leave(warp_barriers[current->linear / 32]);
    leave(group_barriers[current->linear / 128]);
    // uc_link returns to the scheduler.
}

enum class Schedule { Forward, Reverse, WarpsAhead };

// Resumes fiber `f` until it next yields; whether it moved (arrived somewhere or finished).
bool resume(Fiber &f) {
    progressed = false;
    current = &f;
    threadIdx = f.tid;
    swapcontext(&scheduler, &f.ctx);
    current = nullptr;
    return progressed;
}

void run_block(Schedule schedule) {
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    for (unsigned i = 0; i < n; ++i) {
        Fiber &f = fibers[i];
        f.done = false;
        f.reset_async();
        f.linear = i;
        f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, trampoline, 0);
    }
    block_barrier = Barrier{n, 0, 0};
    warp_barriers.assign((n + 31) / 32, Barrier{});
    for (unsigned w = 0; w < warp_barriers.size(); ++w) {
        warp_barriers[w].live = n - 32 * w < 32 ? n - 32 * w : 32;
    }
    group_barriers.assign((n + 127) / 128, Barrier{});
    for (unsigned w = 0; w < group_barriers.size(); ++w) {
        group_barriers[w].live = n - 128 * w < 128 ? n - 128 * w : 128;
    }
    group_slots.assign(n, nullptr);
    if (dynamic_smem != nullptr) {
        std::memset(dynamic_smem->data, 0xff, dynamic_smem->size);
        generic_writer.assign(dynamic_smem->size, 0);
    }
    const unsigned warps = (n + 31) / 32;
    for (;;) {
        bool alive = false, moved = false;
        if (schedule == Schedule::WarpsAhead) {
            for (unsigned w = warps; w-- > 0;) {
                for (bool again = true; again;) {
                    again = false;
                    for (unsigned i = 32 * w; i < n && i < 32 * (w + 1); ++i) {
                        if (!fibers[i].done) {
                            alive = true;
                            again |= resume(fibers[i]);
                        }
                    }
                    moved |= again;
                }
            }
        } else {
            for (unsigned k = 0; k < n; ++k) {
                Fiber &f = fibers[schedule == Schedule::Reverse ? n - 1 - k : k];
                if (!f.done) {
                    alive = true;
                    moved |= resume(f);
                }
            }
        }
        if (!alive) {
            return;
        }
        if (!moved) {
            fail_plain("deadlock in block (%u,%u,%u): threads wait at a barrier the others never "
                       "reach",
                       blockIdx.x, blockIdx.y, blockIdx.z);
        }
    }
}

void on_fault(int sig, siginfo_t *info, void *) {
    char at[128];
    where(at, sizeof at);
    char msg[256];
    const int len = std::snprintf(msg, sizeof msg,
                                  "kernel emulator: %s at address %p in %s (outside every "
                                  "buffer, or a stack overflow)\n",
                                  sig == SIGSEGV ? "segmentation fault" : "bus error",
                                  info->si_addr, at);
    if (len > 0) {
        ssize_t ignored = write(2, msg, (size_t)len);
        (void)ignored;
    }
    _exit(4);
}

// ---- arguments ----------------------------------------------------------------------------

enum class Kind { Buffer, I32, U32, I64, U64, F32 };

struct Arg {
    Kind kind;
    std::string spec;
    long long i = 0;
    unsigned long long u = 0;
    float f = 0.f;
    Guarded *buffer = nullptr;
    std::string write_to;
};

std::vector<unsigned char> read_file(const std::string &path) {
    FILE *fp = std::fopen(path.c_str(), "rb");
    if (fp == nullptr) {
        fail_plain("cannot read %s", path.c_str());
    }
    std::vector<unsigned char> bytes;
    unsigned char chunk[65536];
    size_t got;
    while ((got = std::fread(chunk, 1, sizeof chunk, fp)) > 0) {
        bytes.insert(bytes.end(), chunk, chunk + got);
    }
    std::fclose(fp);
    return bytes;
}

Arg parse_arg(const std::string &spec) {
    const size_t colon = spec.find(':');
    if (colon == std::string::npos) {
        fail_plain("argument %s is not KIND:VALUE", spec.c_str());
    }
    const std::string kind = spec.substr(0, colon), rest = spec.substr(colon + 1);
    Arg a;
    a.kind = Kind::Buffer;
    a.spec = spec;
    if (kind == "in" || kind == "inout") {
        std::string in = rest;
        if (kind == "inout") {
            const size_t c = rest.find(':');
            if (c == std::string::npos) {
                fail_plain("inout wants IN:OUT, got %s", spec.c_str());
            }
            in = rest.substr(0, c);
            a.write_to = rest.substr(c + 1);
        }
        const std::vector<unsigned char> bytes = read_file(in);
        a.buffer = new Guarded(bytes.size());
        if (!bytes.empty()) {
            std::memcpy(a.buffer->data, bytes.data(), bytes.size());
        }
    } else if (kind == "out") {
        const size_t c = rest.rfind(':');
        if (c == std::string::npos) {
            fail_plain("out wants PATH:BYTES, got %s", spec.c_str());
        }
        a.write_to = rest.substr(0, c);
        a.buffer = new Guarded(std::stoull(rest.substr(c + 1)));
        std::memset(a.buffer->data, 0xff, a.buffer->size);
    } else if (kind == "i32" || kind == "i64") {
        a.kind = kind == "i32" ? Kind::I32 : Kind::I64;
        a.i = std::stoll(rest);
    } else if (kind == "u32" || kind == "u64") {
        a.kind = kind == "u32" ? Kind::U32 : Kind::U64;
        a.u = std::stoull(rest);
    } else if (kind == "f32") {
        a.kind = Kind::F32;
        a.f = std::stof(rest);
    } else {
        fail_plain("unknown argument kind in %s", spec.c_str());
    }
    return a;
}

template <class T> T convert(const Arg &a, size_t index) {
    auto wrong = [&](const char *want) {
        fail_plain("parameter %zu wants %s, the launch passed %s", index, want, a.spec.c_str());
    };
    if constexpr (std::is_pointer_v<T>) {
        if (a.kind != Kind::Buffer) {
            wrong("a buffer");
        }
        return reinterpret_cast<T>(a.buffer->data);
    } else if constexpr (std::is_same_v<T, float>) {
        if (a.kind != Kind::F32) {
            wrong("f32");
        }
        return a.f;
    } else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) {
        if (a.kind != (sizeof(T) == 4 ? Kind::I32 : Kind::I64) || (sizeof(T) != 4 && sizeof(T) != 8)) {
            wrong(sizeof(T) == 4 ? "i32" : "i64");
        }
        return (T)a.i;
    } else {
        static_assert(std::is_integral_v<T> && std::is_unsigned_v<T>, "unsupported parameter type");
        if (a.kind != (sizeof(T) == 4 ? Kind::U32 : Kind::U64) || (sizeof(T) != 4 && sizeof(T) != 8)) {
            wrong(sizeof(T) == 4 ? "u32" : "u64");
        }
        return (T)a.u;
    }
}

template <class... P, size_t... I>
std::tuple<P...> convert_all(const std::vector<Arg> &args, std::index_sequence<I...>) {
    return std::tuple<P...>(convert<P>(args[I], I)...);
}

struct Launch {
    uint3 grid, block;
    size_t smem;
    Schedule schedule;
};

template <class... P> void launch(void (*kernel)(P...), const std::vector<Arg> &args, const Launch &l) {
    if (args.size() != sizeof...(P)) {
        fail_plain("the kernel takes %zu parameters, the launch passed %zu", sizeof...(P),
                   args.size());
    }
    struct Bound {
        void (*kernel)(P...);
        std::tuple<P...> params;
    } bound{kernel, convert_all<P...>(args, std::index_sequence_for<P...>{})};
    body = [](void *p) {
        Bound *b = static_cast<Bound *>(p);
        std::apply(b->kernel, b->params);
    };
    body_arg = &bound;
    gridDim = l.grid;
    blockDim = l.block;
    const unsigned threads = l.block.x * l.block.y * l.block.z;
    if (threads == 0 || threads > 1024) {
        fail_plain("a block of %u threads (1 to 1024)", threads);
    }
    fibers = std::vector<Fiber>(threads);
    std::vector<Guarded *> stacks;
    for (Fiber &f : fibers) {
        stacks.push_back(new Guarded(STACK_BYTES));
        f.stack = stacks.back()->data;
    }
    warp_slots.assign(((threads + 31) / 32) * 32 * SLOT_WORDS, 0);
    if (l.smem > 0) {
        dynamic_smem = new Guarded(l.smem);
    }
    for (unsigned z = 0; z < l.grid.z; ++z) {
        for (unsigned y = 0; y < l.grid.y; ++y) {
            for (unsigned x = 0; x < l.grid.x; ++x) {
                blockIdx = uint3{x, y, z};
                run_block(l.schedule);
            }
        }
    }
    for (Guarded *g : stacks) {
        delete g;
    }
}

struct Entry {
    const char *name;
    void (*run)(const std::vector<Arg> &, const Launch &);
};

#define KERNEL(ns, fn)                                                                         \
    Entry {                                                                                    \
        #fn, [](const std::vector<Arg> &a, const Launch &l) { launch(&ns::fn, a, l); }         \
    }

const Entry KERNELS[] = {
    KERNEL(k_adaln, headshot_norm_modulate_bf16),
    KERNEL(k_adaln, headshot_norm_modulate_e4m3),
    KERNEL(k_adaln, headshot_gated_residual_bf16),
    KERNEL(k_conv_gemm, headshot_conv_pad3_bf16),
    KERNEL(k_conv_gemm, headshot_conv_crop_bias_bf16),
    KERNEL(k_conv_implicit, headshot_conv_prep_nhwc_bf16),
    KERNEL(k_conv_implicit, headshot_conv_prep_nhwc_vec_bf16),
    KERNEL(k_conv_implicit, headshot_conv3x3_nhwc_bf16),
    KERNEL(k_conv_implicit, headshot_conv3x3_wide_nhwc_bf16),
    KERNEL(k_conv_implicit, headshot_conv_nhwc_out_bf16),
    KERNEL(k_conv_implicit, headshot_bias_residual_nchw_bf16),
    KERNEL(k_conv_wgmma, headshot_conv3x3_wgmma_nhwc_bf16),
    KERNEL(k_flash_attn, headshot_flash_attn_pipe4_bf16_d128),
    KERNEL(k_flash_attn, headshot_flash_attn_wide_bf16_d128),
    KERNEL(k_flash_attn, headshot_flash_attn_wide32_bf16_d128),
    KERNEL(k_flash_attn, headshot_flash_attn_wide32_lazy_bf16_d128),
    KERNEL(k_flash_attn, headshot_flash_attn_wide_lazy_bf16_d128),
    KERNEL(k_flash_wgmma, headshot_transpose_v_bf16),
    KERNEL(k_flash_wgmma, headshot_flash_attn_wgmma_bf16_d128),
    KERNEL(k_flash_wgmma, headshot_flash_attn_wgmma_pipe_bf16_d128),
    KERNEL(k_fp8_quant, headshot_amax_bf16),
    KERNEL(k_fp8_quant, headshot_quantize_e4m3),
    KERNEL(k_fp8_quant, headshot_quantize_rows_e4m3),
    KERNEL(k_group_norm, headshot_group_stats_bf16),
    KERNEL(k_group_norm, headshot_group_apply_bf16),
    KERNEL(k_group_norm, headshot_group_finalize_bf16),
    KERNEL(k_norm_rope, headshot_rmsnorm_rope_bf16),
};

Fiber &self() {
    if (current == nullptr) {
        fail_plain("a device function ran outside a block");
    }
    return *current;
}

bool in_smem(const void *p, size_t bytes) {
    const unsigned char *c = static_cast<const unsigned char *>(p);
    return dynamic_smem != nullptr && c >= dynamic_smem->data &&
           c + bytes <= dynamic_smem->data + dynamic_smem->size;
}

uint16_t half_of(uint32_t word, int k) { return (uint16_t)(k & 1 ? word >> 16 : word & 0xffff); }

float bf16_value(uint16_t bits) { return emu_bits_f32((uint32_t)bits << 16); }

} // namespace

// ---- what cuda_emu.h declares --------------------------------------------------------------

void emu_fail(const char *what) {
    char at[128];
    where(at, sizeof at);
    fail_plain("%s (%s)", what, at);
}

unsigned emu_lane() { return self().linear & 31; }

unsigned char *emu_dynamic_smem() {
    if (dynamic_smem == nullptr) {
        emu_fail("the kernel uses dynamic shared memory, the launch gave none");
    }
    return dynamic_smem->data;
}

__attribute__((noinline)) void __syncthreads() {
    self();
    wait(block_barrier);
}

__attribute__((noinline)) void emu_warp_exchange(unsigned mask, const uint32_t *mine, int words,
                                                 uint32_t *all) {
    Fiber &f = self();
    Barrier &warp = warp_barriers[f.linear / 32];
    if (mask != 0xffffffffu) {
        emu_fail("warp operations with a partial mask are not emulated");
    }
    if (warp.live != 32) {
        emu_fail("a full-mask warp operation while lanes of the warp have exited");
    }
    uint32_t *slots = &warp_slots[(f.linear / 32) * 32 * SLOT_WORDS];
    std::memcpy(slots + (f.linear & 31) * SLOT_WORDS, mine, sizeof(uint32_t) * words);
    wait(warp);
    if (warp.live != 32) {
        emu_fail("lanes of the warp exited instead of joining a full-mask warp operation");
    }
    for (int lane = 0; lane < 32; ++lane) {
        std::memcpy(all + lane * words, slots + lane * SLOT_WORDS, sizeof(uint32_t) * words);
    }
    wait(warp);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, lane = 4g + t (PTX ISA fragment
// layouts): A a0 (g, 2t..) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..); B b0 (k 2t.., n g)
// b1 (k 2t+8.., n g); C c0 c1 (g, 2t, 2t+1) c2 c3 (g+8, 2t, 2t+1). The lower-numbered column
// (or k) of each pair sits in the low half of its register.
void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    uint32_t all[32 * 6];
    emu_warp_exchange(0xffffffffu, mine, 6, all);
    const unsigned lane = emu_lane(), g = lane >> 2, t = lane & 3;
    auto A = [&](int r, int k) {
        const int src = 4 * (r & 7) + ((k & 7) >> 1);
        const int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return bf16_value(half_of(all[src * 6 + reg], k));
    };
    auto B = [&](int k, int n) {
        const int src = 4 * n + ((k & 7) >> 1);
        const int reg = 4 + (k >= 8 ? 1 : 0);
        return bf16_value(half_of(all[src * 6 + reg], k));
    };
    for (int i = 0; i < 4; ++i) {
        const int r = (int)g + (i >= 2 ? 8 : 0), n = 2 * (int)t + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) {
            acc += A(r, k) * B(k, n);
        }
        c[i] = acc;
    }
}

namespace {
// The row addresses of ldmatrix: lane L names row (L & 7) of matrix (L >> 3), 16-byte aligned,
// in shared memory.
void row_addresses(const void *p, const uint16_t *rows[32]) {
    if (((uintptr_t)p & 15) != 0 || !in_smem(p, 16)) {
        emu_fail("ldmatrix row address not 16-byte aligned inside the dynamic shared memory");
    }
    const uint64_t mine = (uint64_t)(uintptr_t)p;
    uint32_t words[2] = {(uint32_t)mine, (uint32_t)(mine >> 32)};
    uint32_t all[64];
    emu_warp_exchange(0xffffffffu, words, 2, all);
    for (int lane = 0; lane < 32; ++lane) {
        rows[lane] = reinterpret_cast<const uint16_t *>(
            (uintptr_t)((uint64_t)all[2 * lane] | (uint64_t)all[2 * lane + 1] << 32));
    }
}
} // namespace

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: register m of lane L holds row L/4, columns
// 2(L%4) and 2(L%4)+1 of matrix m.
void ldmatrix_x4(uint32_t r[4], const void *p) {
    const uint16_t *rows[32];
    row_addresses(p, rows);
    const unsigned lane = emu_lane();
    for (int m = 0; m < 4; ++m) {
        const uint16_t *row = rows[m * 8 + (lane >> 2)];
        r[m] = (uint32_t)row[2 * (lane & 3)] | (uint32_t)row[2 * (lane & 3) + 1] << 16;
    }
}

// .trans: the same fragment of each matrix's transpose, so register m of lane L holds rows
// 2(L%4) and 2(L%4)+1, column L/4.
void ldmatrix_x4_trans(uint32_t r[4], const void *p) {
    const uint16_t *rows[32];
    row_addresses(p, rows);
    const unsigned lane = emu_lane();
    for (int m = 0; m < 4; ++m) {
        const uint16_t *lo = rows[m * 8 + 2 * (lane & 3)], *hi = rows[m * 8 + 2 * (lane & 3) + 1];
        r[m] = (uint32_t)lo[lane >> 2] | (uint32_t)hi[lane >> 2] << 16;
    }
}

namespace {
void land(const Copy &c) {
    if (c.bytes > 0) {
        std::memcpy(c.dst, c.src, (size_t)c.bytes);
    }
    std::memset(c.dst + c.bytes, 0, (size_t)(16 - c.bytes));
    Fiber &f = self();
    const size_t at = (size_t)(c.dst - dynamic_smem->data);
    for (size_t i = 0; i < 16; ++i) {
        generic_writer[at + i] = (uint16_t)(f.linear + 1);
    }
    f.unfenced_copies.push_back(c.dst);
}
} // namespace

// fence.proxy.async.shared::cta: this thread's landed copies become visible to wgmma.
void fence_proxy_async() {
    Fiber &f = self();
    for (unsigned char *dst : f.unfenced_copies) {
        const size_t at = (size_t)(dst - dynamic_smem->data);
        for (size_t i = 0; i < 16; ++i) {
            if (generic_writer[at + i] == f.linear + 1) {
                generic_writer[at + i] = 0;
            }
        }
    }
    f.unfenced_copies.clear();
}

void wgmma_fence() { self().wgmma_fenced = true; }

// cp.async.cg.shared.global 16 bytes, `bytes` of them read and the rest zero-filled: at once
// (eager_copies) or when a cp.async.wait_group retires the group.
void cp_async_16(void *dst, const void *src, int bytes) {
    if (((uintptr_t)dst & 15) != 0 || !in_smem(dst, 16)) {
        emu_fail("cp.async destination not 16-byte aligned inside the dynamic shared memory");
    }
    if (bytes < 0 || bytes > 16 || (bytes > 0 && ((uintptr_t)src & 15) != 0)) {
        emu_fail("cp.async source not 16-byte aligned, or a size outside 0..16");
    }
    const Copy copy{static_cast<unsigned char *>(dst), static_cast<const unsigned char *>(src),
                    bytes};
    if (eager_copies) {
        land(copy);
        return;
    }
    self().copies.open.push_back(copy);
}

void cp_async_commit() { self().copies.commit(); }

void emu_cp_async_wait(int keep) {
    Fiber &f = self();
    while (f.copies.pending.size() > (size_t)keep) {
        for (const Copy &c : f.copies.pending.front()) {
            land(c);
        }
        f.copies.pending.erase(f.copies.pending.begin());
    }
}

// ---- wgmma -------------------------------------------------------------------------------

uint32_t smem_addr(const void *p) {
    if (!in_smem(p, 1)) {
        emu_fail("a shared-memory address outside the dynamic shared memory");
    }
    return (uint32_t)(static_cast<const unsigned char *>(p) - dynamic_smem->data);
}

namespace {
// A K-major no-swizzle operand of `rows` rows × 16 given by `desc`, read as bf16 values
// (row-major, rows × 16). Every byte read must be visible to the async proxy: written by
// cp.async, it needs a fence.proxy.async by its writer first.
std::vector<float> read_operand(uint64_t desc, int rows) {
    if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) {
        emu_fail("wgmma descriptor with a swizzle or base offset (not emulated)");
    }
    if (dynamic_smem == nullptr) {
        emu_fail("wgmma without dynamic shared memory");
    }
    const uint32_t offset = (uint32_t)(desc & 0x3fff) << 4;
    const uint32_t lbo = (uint32_t)((desc >> 16) & 0x3fff) << 4;
    const uint32_t sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
    const unsigned char *start = dynamic_smem->data + offset;
    const size_t last = (size_t)((rows - 1) / 8) * sbo + lbo + 7 * 16 + 16;
    if (!in_smem(start, last)) {
        emu_fail("a wgmma operand reaches outside the dynamic shared memory");
    }
    std::vector<float> values((size_t)rows * 16);
    for (int row = 0; row < rows; ++row) {
        for (int k = 0; k < 16; ++k) {
            const unsigned char *at =
                start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
            const size_t byte = (size_t)(at - dynamic_smem->data);
            if (generic_writer[byte] != 0 || generic_writer[byte + 1] != 0) {
                emu_fail("wgmma reads shared memory that cp.async wrote with no "
                         "fence.proxy.async since");
            }
            uint16_t bits;
            std::memcpy(&bits, at, 2);
            values[(size_t)row * 16 + k] = bf16_value(bits);
        }
    }
    return values;
}

// Records a wgmma with its shared-memory operands as they are now; the product is taken at
// retire from these, after checking that shared memory still holds them.
void issue(Wgmma op) {
    Fiber &f = self();
    if (f.linear / 128 >= group_barriers.size() || group_barriers[f.linear / 128].live != 128) {
        emu_fail("wgmma needs a whole warpgroup of 128 live threads");
    }
    if (!f.wgmma_fenced) {
        emu_fail("wgmma issued with no wgmma.fence since the thread last waited on wgmma "
                 "(its registers may have been written)");
    }
    if (!op.a_in_registers) {
        op.a_smem = read_operand(op.desc_a, 64);
    }
    op.b_smem = read_operand(op.desc_b, op.n);
    bool first_writer = true;
    for (const Wgmma &earlier : f.wgmmas.open) {
        first_writer = first_writer && earlier.d != op.d;
    }
    if (first_writer) {
        op.d_at_issue.assign(op.d, op.d + op.n / 2);
    }
    f.wgmmas.open.push_back(std::move(op));
}
} // namespace

void wgmma_m64n64k16_ss(float d[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    issue(Wgmma{d, 64, false, {0, 0, 0, 0}, nullptr, desc_a, desc_b, accumulate != 0, {}, {}, {}});
}

void wgmma_m64n128k16_ss(float d[64], uint64_t desc_a, uint64_t desc_b) {
    issue(Wgmma{d, 128, false, {0, 0, 0, 0}, nullptr, desc_a, desc_b, true, {}, {}, {}});
}

void wgmma_m64n128k16_rs(float d[64], const uint32_t a[4], uint64_t desc_b) {
    issue(Wgmma{d, 128, true, {a[0], a[1], a[2], a[3]}, a, 0, desc_b, true, {}, {}, {}});
}

void wgmma_commit() { self().wgmmas.commit(); }

// Retires the oldest groups down to `keep`, the warpgroup together. Thread T of a warpgroup
// (warp w = T/32, lane = 4g + t) owns D rows 16w + g and 16w + g + 8, columns 8j + 2t and
// 8j + 2t + 1: register 4j + c is row 16w + g + 8·(c ≥ 2), column 8j + 2t + (c & 1). A from
// registers is mma.sync's m16n8k16 A fragment per warp (a0 (g, 2t..) a1 (g+8, 2t..) a2 (g,
// 2t+8..) a3 (g+8, 2t+8..)). Fails when shared memory under the group, its A registers or
// its accumulators changed while it was in flight.
void emu_wgmma_wait(int keep) {
    Fiber &f = self();
    const unsigned first = f.linear / 128 * 128, me = f.linear - first;
    Barrier &group = group_barriers[f.linear / 128];
    f.wgmma_fenced = false;
    while (f.wgmmas.pending.size() > (size_t)keep) {
        const std::vector<Wgmma> &ops = f.wgmmas.pending.front();
        group_slots[f.linear] = &ops;
        wait(group);
        if (group.live != 128) {
            emu_fail("threads of the warpgroup exited instead of retiring their wgmma");
        }
        for (unsigned other = first; other < first + 128; ++other) {
            const std::vector<Wgmma> &theirs = *group_slots[other];
            if (theirs.size() != ops.size()) {
                emu_fail("the threads of a warpgroup retire different numbers of wgmma");
            }
            for (size_t i = 0; i < ops.size(); ++i) {
                if (theirs[i].n != ops[i].n || theirs[i].a_in_registers != ops[i].a_in_registers ||
                    theirs[i].desc_b != ops[i].desc_b ||
                    (!ops[i].a_in_registers && theirs[i].desc_a != ops[i].desc_a) ||
                    theirs[i].accumulate != ops[i].accumulate) {
                    emu_fail("the threads of a warpgroup issued different wgmma");
                }
            }
        }
        const unsigned w = me / 32, lane = me % 32, g = lane / 4, t = lane % 4;
        for (size_t i = 0; i < ops.size(); ++i) {
            const Wgmma &op = ops[i];
            if (read_operand(op.desc_b, op.n) != op.b_smem ||
                (!op.a_in_registers && read_operand(op.desc_a, 64) != op.a_smem)) {
                emu_fail("shared memory under an in-flight wgmma changed before it was retired");
            }
            if (op.a_in_registers && std::memcmp(op.a_registers, op.a, sizeof op.a) != 0) {
                emu_fail("A registers of an in-flight wgmma were written before it was retired");
            }
            if (!op.d_at_issue.empty() &&
                std::memcmp(op.d, op.d_at_issue.data(), sizeof(float) * op.d_at_issue.size()) != 0) {
                emu_fail("accumulators of an in-flight wgmma were written before it was retired");
            }
        }
        wait(group);
        for (size_t i = 0; i < ops.size(); ++i) {
            const Wgmma &op = ops[i];
            auto a_at = [&](int row, int k) -> float {
                if (!op.a_in_registers) {
                    return op.a_smem[(size_t)row * 16 + k];
                }
                const unsigned src = first + (row / 16) * 32 + 4 * (row % 8) + (k % 8) / 2;
                const int reg = ((row % 16) >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
                return bf16_value(half_of((*group_slots[src])[i].a[reg], k));
            };
            for (int r = 0; r < op.n / 2; ++r) {
                const int j = r / 4, c = r % 4;
                const int row = (int)(16 * w + g) + (c >= 2 ? 8 : 0);
                const int col = 8 * j + 2 * (int)t + (c & 1);
                float sum = op.accumulate ? op.d[r] : 0.f;
                for (int k = 0; k < 16; ++k) {
                    sum += a_at(row, k) * op.b_smem[(size_t)col * 16 + k];
                }
                op.d[r] = sum;
            }
        }
        wait(group);
        f.wgmmas.pending.erase(f.wgmmas.pending.begin());
    }
}

int main(int argc, char **argv) {
    int at = 1;
    Schedule schedule = Schedule::Forward;
    if (at + 1 < argc && std::string(argv[at]) == "--schedule") {
        const std::string name = argv[at + 1];
        if (name == "reverse") {
            schedule = Schedule::Reverse;
        } else if (name == "warps-ahead") {
            schedule = Schedule::WarpsAhead;
        } else if (name != "forward") {
            fail_plain("unknown schedule %s (forward, reverse, warps-ahead)", name.c_str());
        }
        at += 2;
    }
    eager_copies = schedule != Schedule::Forward;
    if (argc - at < 8) {
        fail_plain("usage: runner [--schedule forward|reverse|warps-ahead] KERNEL GX GY GZ BX BY "
                   "BZ SMEM_BYTES ARG...");
    }
    const std::string name = argv[at];
    auto number = [&](int i) { return (unsigned)std::stoul(argv[at + i]); };
    const Launch l{uint3{number(1), number(2), number(3)}, uint3{number(4), number(5), number(6)},
                   (size_t)std::stoull(argv[at + 7]), schedule};
    std::vector<Arg> args;
    for (int i = at + 8; i < argc; ++i) {
        args.push_back(parse_arg(argv[i]));
    }

    static unsigned char alt_stack[1 << 16];
    stack_t ss{};
    ss.ss_sp = alt_stack;
    ss.ss_size = sizeof alt_stack;
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);

    const Entry *entry = nullptr;
    for (const Entry &e : KERNELS) {
        if (name == e.name) {
            entry = &e;
        }
    }
    if (entry == nullptr) {
        fail_plain("no kernel named %s", name.c_str());
    }
    entry->run(args, l);

    for (const Arg &a : args) {
        if (a.write_to.empty()) {
            continue;
        }
        FILE *fp = std::fopen(a.write_to.c_str(), "wb");
        if (fp == nullptr || std::fwrite(a.buffer->data, 1, a.buffer->size, fp) != a.buffer->size ||
            std::fclose(fp) != 0) {
            fail_plain("cannot write %s", a.write_to.c_str());
        }
    }
    return 0;
}

//! How the implicit-GEMM convolution's kernels are launched (`host/kernels/conv_implicit.cu`,
//! `conv_wgmma.cu`): which kernel, grid, block and shared memory for a shape. Compiled without
//! the `cuda` feature too, so the CPU emulator's tests (`tests/kernel_emulation/decoder.rs`)
//! launch the kernels exactly as `conv_implicit_cuda.rs` does instead of restating it.

/// Output channels per block.
pub const BLOCK_CHANNELS: usize = 128;
/// Input channels per K step.
pub const SLICE: usize = 32;

/// A kernel launch: entry point, grid, threads per block, dynamic shared memory bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub entry: &'static str,
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub smem: u32,
}

/// The convolution kernel's block: output pixels (of one row) × 128 output channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// 128 pixels, 8 warps, two blocks an SM.
    Narrow,
    /// 256 pixels, 16 warps, one block an SM: the weights each block reads from L2 per step
    /// feed twice the pixels. For rows at least 256 wide (narrower ones would leave half a
    /// block idle): [`Tile::for_width`].
    Wide,
    /// 128 pixels, two warpgroups issuing Hopper's wgmma (`conv_wgmma.cu`), two blocks an SM.
    /// Only in builds for compute capability 9.0, on a 9.0 card (`Tile::runs_on`, with the
    /// `cuda` feature).
    Wgmma,
}

impl Tile {
    /// The tile for output rows `w` wide given the `preferred` one: [`Tile::Wide`] only where
    /// `w` ≥ 256, else [`Tile::Narrow`].
    pub fn for_width(w: usize, preferred: Tile) -> Self {
        match preferred {
            Self::Wide if w < 256 => Self::Narrow,
            tile => tile,
        }
    }

    /// The tile's suffix in check and bench row names (`conv3x3_implicit_wide_…`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Narrow => "",
            Self::Wide => "_wide",
            Self::Wgmma => "_wgmma",
        }
    }

    /// Output pixels per block.
    pub fn pixels(self) -> usize {
        match self {
            Self::Narrow | Self::Wgmma => 128,
            Self::Wide => 256,
        }
    }

    /// The kernel's entry point.
    pub fn entry(self) -> &'static str {
        match self {
            Self::Narrow => "headshot_conv3x3_nhwc_bf16",
            Self::Wide => "headshot_conv3x3_wide_nhwc_bf16",
            Self::Wgmma => "headshot_conv3x3_wgmma_nhwc_bf16",
        }
    }

    /// Dynamic shared memory (`ConvTile::SMEM_BYTES`, `CW_SMEM_BYTES`): the larger of the
    /// three-stage ring (pixels + 2 and 3 · 128 weight rows of 64 bytes a stage, in either
    /// layout) and the epilogue's f32 tile (128 channels × (pixels + 4)).
    pub fn smem_bytes(self) -> u32 {
        let ring = 3 * (self.pixels() + 2 + 3 * BLOCK_CHANNELS) * 2 * SLICE;
        let epilogue = BLOCK_CHANNELS * (self.pixels() + 4) * 4;
        ring.max(epilogue) as u32
    }

    /// The convolution's launch for an `h × w` output of `cout` channels with the tile
    /// [`Tile::for_width`] picks for `self`.
    pub fn launch(self, cout: usize, h: usize, w: usize) -> Launch {
        let tile = Self::for_width(w, self);
        Launch {
            entry: tile.entry(),
            grid: (
                w.div_ceil(tile.pixels()) as u32,
                h as u32,
                (cout / BLOCK_CHANNELS) as u32,
            ),
            threads: 2 * tile.pixels() as u32,
            smem: tile.smem_bytes(),
        }
    }
}

/// The prep pass's launch for an `h × w` output (upsampled 2× from a source `w0` wide when
/// `w0 < w`) of `channels` channels: the vector kernel where the source rows are whole
/// 16-byte vectors (every decoder width at 1024 and 768 pixels), else the scalar one.
pub fn prep_launch(channels: usize, h: usize, w: usize, w0: usize) -> Launch {
    let (entry, columns) = if w0.is_multiple_of(8) {
        ("headshot_conv_prep_nhwc_vec_bf16", w.div_ceil(64))
    } else {
        ("headshot_conv_prep_nhwc_bf16", (w + 2).div_ceil(32))
    };
    Launch {
        entry,
        grid: (columns as u32, (h + 2) as u32, (channels / SLICE) as u32),
        threads: 256,
        smem: 0,
    }
}

/// The pass that turns cuDNN's NHWC output of one image (`hw` pixels × `cout` channels) into
/// NCHW with the bias and residual added (`HEADSHOT_CONV=implicit_cudnn`): 32 × 32 tiles.
pub fn nhwc_out_launch(cout: usize, hw: usize) -> Launch {
    Launch {
        entry: "headshot_conv_nhwc_out_bf16",
        grid: (hw.div_ceil(32) as u32, cout.div_ceil(32) as u32, 1),
        threads: 256,
        smem: 0,
    }
}

/// The pass that adds the bias (and the residual) to an NCHW output of `n` values in
/// channel planes of `hw` (a multiple of 8): 8 values a thread (`HEADSHOT_CONV=cudnn`).
pub fn bias_residual_launch(n: usize) -> Launch {
    Launch {
        entry: "headshot_bias_residual_nchw_bf16",
        grid: ((n / 8).div_ceil(256) as u32, 1, 1),
        threads: 256,
        smem: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_match_the_kernels() {
        // conv_implicit.cu, ConvTile<2> and ConvTile<4>: the ring for 128 pixels, the f32
        // epilogue tile (128 × 260 × 4) for 256; conv_wgmma.cu: CW_SMEM_BYTES.
        assert_eq!(Tile::Narrow.smem_bytes(), 3 * (130 * 64 + 3 * 128 * 64));
        assert_eq!(Tile::Wide.smem_bytes(), 128 * 260 * 4);
        assert_eq!(Tile::Wgmma.smem_bytes(), 3 * (4 * 130 * 16 + 4 * 384 * 16));
        // Each fits an H100's 227 KiB of shared memory per block.
        assert!(Tile::Wide.smem_bytes() <= 227 * 1024);
        let wide = Tile::Wide.launch(256, 1024, 1024);
        assert_eq!((wide.grid, wide.threads), ((4, 1024, 2), 512));
        // Rows under 256 take the narrow tile even when the wide one is asked for.
        let narrow = Tile::Wide.launch(512, 128, 136);
        assert_eq!(narrow.entry, Tile::Narrow.entry());
        assert_eq!((narrow.grid, narrow.threads), ((2, 128, 4), 256));
        assert_eq!(Tile::Wgmma.launch(128, 8, 8).threads, 256);
        assert_eq!(Tile::for_width(128, Tile::Wgmma), Tile::Wgmma);
    }

    #[test]
    fn the_prep_pass_takes_vectors_where_source_rows_are_whole_vectors() {
        let vec = prep_launch(128, 1024, 1024, 512);
        assert_eq!(vec.entry, "headshot_conv_prep_nhwc_vec_bf16");
        assert_eq!(vec.grid, (16, 1026, 4));
        let scalar = prep_launch(64, 24, 24, 12);
        assert_eq!(scalar.entry, "headshot_conv_prep_nhwc_bf16");
        assert_eq!(scalar.grid, (1, 26, 2));
    }
}

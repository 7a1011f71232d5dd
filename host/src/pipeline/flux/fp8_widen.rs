//! Per-row FP8 rows widened back to full precision with plain tensor ops: the per-row FP8
//! projection's way out where cuBLASLt refuses the GEMM's shape with per-row scales.
//!
//! cuBLASLt's "outer vector" scaling is not offered for every shape: on an H100 (cuBLAS 12.9+)
//! it refused the double block's text-stream MLP down-projection (256 tokens × 12288 inputs)
//! while taking every other projection of the model. The quantized rows are packed in one u8
//! buffer (e4m3 values, then little-endian f32 scales; `fp8_rows_cuda.rs`) and candle cannot
//! cast e4m3 on CUDA, nor reinterpret bytes, so both are decoded arithmetically from their
//! byte values here. That runs on any device, which is also what lets the CPU tests hold the
//! decoding to candle's own e4m3 conversion.

use candle_core::{DType, Result, Tensor};

/// `rows × width` values in `dtype`, decoded from `packed` (u8, 1-D): e4m3 bytes from offset 0,
/// row-major, and one little-endian f32 scale per row from byte `scales_at`. Each value is
/// its e4m3 number times its row's scale (the per-row quantizer's `values · scale ≈ row`).
/// The quantizer never writes NaN bytes (0x7f, 0xff); they would decode as ±480.
pub fn widen_packed_rows(
    packed: &Tensor,
    rows: usize,
    width: usize,
    scales_at: usize,
    dtype: DType,
) -> Result<Tensor> {
    if packed.dtype() != DType::U8 || packed.rank() != 1 {
        candle_core::bail!(
            "packed FP8 rows are a 1-D u8 buffer, got {:?} {:?}",
            packed.dtype(),
            packed.dims()
        );
    }
    if scales_at < rows * width || packed.dim(0)? < scales_at + 4 * rows {
        candle_core::bail!(
            "a packed buffer of {} bytes cannot hold {rows}×{width} values and {rows} scales at {scales_at}",
            packed.dim(0)?
        );
    }
    let values = decode_e4m3(&packed.narrow(0, 0, rows * width)?.reshape((rows, width))?)?;
    let scales = decode_f32_le(&packed.narrow(0, scales_at, 4 * rows)?.reshape((rows, 4))?)?;
    values.broadcast_mul(&scales)?.to_dtype(dtype)
}

/// e4m3 (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities) byte values
/// to f32, elementwise and exactly: `(normal + m/8) · 2^(max(e, 1) − 7)`, negated for a set
/// sign bit.
fn decode_e4m3(bytes: &Tensor) -> Result<Tensor> {
    let b = bytes.to_dtype(DType::F32)?;
    let high = (&b / 8.0)?.floor()?; // sign · 16 + exponent
    let mantissa = (&b - (&high * 8.0)?)?;
    let sign = (&b / 128.0)?.floor()?;
    let exponent = (&high - (&sign * 16.0)?)?;
    let normal = exponent.gt(0f64)?.to_dtype(DType::F32)?;
    let power = powers_of_two(&exponent.clamp(1f32, 15f32)?, -7)?;
    let magnitude = ((normal + (mantissa / 8.0)?)? * power)?;
    magnitude * ((sign * -2.0)? + 1.0)?
}

/// Positive normal little-endian f32s, one per row of 4 bytes, to an f32 column `(rows, 1)`.
/// Every quantizer scale is one: max |row| / 448, clamped below at 1e-12 / 448 (normal in f32).
fn decode_f32_le(bytes: &Tensor) -> Result<Tensor> {
    let b = bytes.to_dtype(DType::F32)?;
    let byte = |i: usize| b.narrow(1, i, 1);
    let (b0, b1, b2, b3) = (byte(0)?, byte(1)?, byte(2)?, byte(3)?);
    // Bits 23..30 are the exponent: all of b3 but its sign bit, and b2's top bit.
    let b2_top = (&b2 / 128.0)?.floor()?;
    let exponent = ((b3 * 2.0)? + &b2_top)?;
    // 23 mantissa bits, exact in f32 (below 2²⁴).
    let mantissa = ((((b2 - (b2_top * 128.0)?)? * 65536.0)? + (b1 * 256.0)?)? + b0)?;
    let fraction = ((mantissa / 8_388_608.0)? + 1.0)?;
    let power = powers_of_two(&exponent, -127)?;
    fraction * power
}

/// `2^(e + bias)` for each whole number `e` in 0..=255 (f32), exactly: looked up in a table
/// (candle's `exp` rounds, and a scale off by an ulp would no longer round-trip).
fn powers_of_two(exponents: &Tensor, bias: i32) -> Result<Tensor> {
    let table: Vec<f32> = (0..256).map(|e| 2f32.powi(e + bias)).collect();
    let table = Tensor::from_vec(table, 256, exponents.device())?;
    let shape = exponents.shape().clone();
    let index = exponents.flatten_all()?.to_dtype(DType::U32)?;
    table.index_select(&index, 0)?.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// e4m3 decoded from first principles, as the reference.
    fn e4m3(byte: u8) -> f32 {
        let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (((byte >> 3) & 0xf) as i32, (byte & 7) as f32);
        let magnitude = if e == 0 {
            m / 8.0 * 2f32.powi(-6)
        } else {
            (1.0 + m / 8.0) * 2f32.powi(e - 7)
        };
        sign * magnitude
    }

    #[test]
    fn every_e4m3_byte_decodes_to_candles_value() {
        let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        let t = Tensor::from_vec(bytes.clone(), bytes.len(), &Device::Cpu).unwrap();
        let got = decode_e4m3(&t).unwrap().to_vec1::<f32>().unwrap();
        for (&byte, &value) in bytes.iter().zip(&got) {
            let want = e4m3(byte);
            assert_eq!(value, want, "byte {byte:#04x}");
        }
        // The reference agrees with candle's e4m3: each value survives a round trip exactly.
        let values = Tensor::new(got.as_slice(), &Device::Cpu).unwrap();
        let back = values
            .to_dtype(DType::F8E4M3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(back, got);
        assert_eq!(got.iter().cloned().fold(0f32, f32::max), 448.0);
    }

    #[test]
    fn packed_rows_widen_to_values_times_their_row_scale() {
        // Two rows of four values, scales at byte 16 (past 8 value bytes and padding).
        let values = [0x38u8, 0xb8, 0x40, 0x00, 0x7e, 0x01, 0xfe, 0x30];
        let scales = [0.5f32, 3.0e-4];
        let mut packed = values.to_vec();
        packed.resize(16, 0xaa);
        for s in scales {
            packed.extend(s.to_le_bytes());
        }
        let t = Tensor::from_vec(packed.clone(), packed.len(), &Device::Cpu).unwrap();
        let got = widen_packed_rows(&t, 2, 4, 16, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in 0..2 {
            for c in 0..4 {
                let want = e4m3(values[r * 4 + c]) * scales[r];
                let value = got[r][c];
                assert_eq!(value, want, "[{r}][{c}]");
            }
        }
        assert_eq!(got[0][0], 0.5, "0x38 is 1.0");
        // A buffer too short for the scales is refused, not read past.
        assert!(widen_packed_rows(&t, 2, 4, 20, DType::F32).is_err());
        assert!(widen_packed_rows(&t, 3, 4, 16, DType::F32).is_err());
    }
}

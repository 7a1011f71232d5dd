//! Decoded pixels to PNG.

use candle_core::{DType, Device, Tensor};

use super::error::GenerateError;

/// Turns a decoded batch `[B, 3, H, W]` with values in about [-1, 1] into one RGB8 buffer per
/// image, row-major.
pub fn batch_to_rgb(decoded: &Tensor) -> candle_core::Result<Vec<Vec<u8>>> {
    let (b, _, h, w) = decoded.dims4()?;
    let pixels = ((decoded.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .affine(1.0, 0.5)? // round to nearest on the cast below, which truncates
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| pixels[i * per..(i + 1) * per].to_vec())
        .collect())
}

/// Encodes an RGB8 buffer as PNG.
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, GenerateError> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected {
        return Err(GenerateError::Png(format!(
            "{} bytes of pixels for {width}x{height} RGB, expected {expected}",
            rgb.len()
        )));
    }
    let mut out = Vec::with_capacity(expected / 2 + 1024);
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("Software".into(), "headshot (FLUX on candle)".into())
            .map_err(|e| GenerateError::Png(e.to_string()))?;
        let mut writer = enc
            .write_header()
            .map_err(|e| GenerateError::Png(e.to_string()))?;
        writer
            .write_image_data(rgb)
            .map_err(|e| GenerateError::Png(e.to_string()))?;
        writer
            .finish()
            .map_err(|e| GenerateError::Png(e.to_string()))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips() {
        let rgb: Vec<u8> = (0..16 * 8 * 3).map(|i| (i % 251) as u8).collect();
        let bytes = encode_png(&rgb, 16, 8).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (16, 8));
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
        assert!(encode_png(&rgb, 16, 9).is_err());
    }

    #[test]
    fn pixels_map_from_signed_range() {
        let t = Tensor::from_vec(
            vec![-2f32, -1.0, 0.0, 1.0, 2.0, 0.5],
            (1, 3, 1, 2),
            &Device::Cpu,
        )
        .unwrap();
        let rgb = batch_to_rgb(&t).unwrap();
        // channel-last: pixel0 = (c0[0], c1[0], c2[0]) = (-2, 0, 2) -> (0, 128, 255)
        assert_eq!(rgb[0], vec![0, 128, 255, 0, 255, 191]);
    }
}

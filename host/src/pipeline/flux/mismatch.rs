//! Where a failed `--check` comparison goes wrong, in one line.
//!
//! A device session is short and the kernels it checks first ran on an emulator: when one
//! disagrees with the plain ops on the GPU, the next session has only the log to find the
//! bug in. A layout slip leaves a pattern (every eighth channel, the last pixels of a row,
//! one query block), so the line says which indices of each dimension hold the wrong values
//! and which residues modulo 8 they fall on, beside the worst value.

use std::fmt::Write as _;

/// Residues are reported modulo this (an mma fragment's row and column granule).
const GRANULE: usize = 8;

/// The pattern of `fast`'s values that differ from `reference`'s by more than `tolerance` ×
/// max |reference| (non-finite values always do), both laid out row-major in `dims`: how
/// many, the worst, and per dimension which indices and residues mod 8 hold them.
pub fn describe(fast: &[f32], reference: &[f32], dims: &[usize], tolerance: f64) -> String {
    let n = fast.len();
    if n != reference.len() || dims.iter().product::<usize>() != n {
        return format!(
            "{n} values against {} in shape {dims:?}: not comparable",
            reference.len()
        );
    }
    let scale = reference
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())))
        .max(f64::MIN_POSITIVE);
    let bound = tolerance * scale;
    let mut bad = 0usize;
    let mut worst: Option<(usize, f64)> = None;
    let mut seen: Vec<Vec<bool>> = dims.iter().map(|&d| vec![false; d]).collect();
    for (i, (&f, &r)) in fast.iter().zip(reference).enumerate() {
        let error = if f.is_finite() {
            f64::from((f - r).abs())
        } else {
            f64::INFINITY
        };
        if error <= bound {
            continue;
        }
        bad += 1;
        if worst.is_none_or(|(_, e)| error > e) {
            worst = Some((i, error));
        }
        let mut rest = i;
        for (d, &size) in dims.iter().enumerate().rev() {
            seen[d][rest % size] = true;
            rest /= size;
        }
    }
    let Some((at, _)) = worst else {
        return format!("no value off by more than {tolerance:e} of max |reference| ({scale:.3e})");
    };
    let mut line = format!(
        "{bad} of {n} values ({:.3}%) off by more than {tolerance:e} of max |reference| \
         ({scale:.3e}); worst at {:?}: {} against {}",
        100.0 * bad as f64 / n as f64,
        unravel(at, dims),
        fast[at],
        reference[at]
    );
    for (d, hit) in seen.iter().enumerate() {
        if hit.len() > 1 {
            let _ = write!(line, "; dim {d}: {}", indices(hit));
        }
    }
    line
}

/// Row-major multi-index of flat index `i` in `dims`.
fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (d, &size) in dims.iter().enumerate().rev() {
        index[d] = i % size;
        i /= size;
    }
    index
}

/// Which of a dimension's indices hold wrong values: how many, their range, and the residues
/// mod [`GRANULE`] they fall on where that is not all of them.
fn indices(hit: &[bool]) -> String {
    let positions: Vec<usize> = (0..hit.len()).filter(|&i| hit[i]).collect();
    let (Some(first), Some(last)) = (positions.first(), positions.last()) else {
        return format!("none of {}", hit.len());
    };
    let mut text = format!("{} of {} in {first}..={last}", positions.len(), hit.len());
    if hit.len() >= 2 * GRANULE {
        let mut residues = [false; GRANULE];
        for &p in &positions {
            residues[p % GRANULE] = true;
        }
        if residues.iter().any(|r| !r) {
            let list: Vec<String> = (0..GRANULE)
                .filter(|&r| residues[r])
                .map(|r| r.to_string())
                .collect();
            let _ = write!(text, " (only ≡ {} mod {GRANULE})", list.join(","));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(dims: &[usize]) -> Vec<f32> {
        let n: usize = dims.iter().product();
        (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect()
    }

    #[test]
    fn names_the_channels_and_residues_a_layout_slip_leaves() {
        let dims = [2, 32, 4, 24];
        let reference = grid(&dims);
        let mut fast = reference.clone();
        // Channels 3 and 11 of the second image wrong in the last 8 pixels of every row.
        for c in [3, 11] {
            for y in 0..4 {
                for x in 16..24 {
                    let i = ((32 + c) * 4 + y) * 24 + x;
                    fast[i] += 0.5;
                }
            }
        }
        fast[((32 + 11) * 4 + 2) * 24 + 20] += 0.5;
        let line = describe(&fast, &reference, &dims, 1e-2);
        assert!(line.starts_with("64 of 6144 values"), "{line}");
        assert!(line.contains("worst at [1, 11, 2, 20]"), "{line}");
        assert!(line.contains("dim 0: 1 of 2 in 1..=1"), "{line}");
        assert!(
            line.contains("dim 1: 2 of 32 in 3..=11 (only ≡ 3 mod 8)"),
            "{line}"
        );
        assert!(line.contains("dim 2: 4 of 4 in 0..=3;"), "{line}");
        assert!(line.ends_with("dim 3: 8 of 24 in 16..=23"), "{line}");
    }

    #[test]
    fn counts_non_finite_values_and_says_when_nothing_is_off() {
        let dims = [4, 16];
        let reference = grid(&dims);
        assert!(describe(&reference, &reference, &dims, 1e-2).starts_with("no value off"));
        let mut fast = reference.clone();
        fast[17] = f32::NAN;
        let line = describe(&fast, &reference, &dims, 1e-2);
        assert!(line.starts_with("1 of 64 values"), "{line}");
        assert!(line.contains("worst at [1, 1]: NaN"), "{line}");
        assert!(
            line.contains("dim 1: 1 of 16 in 1..=1 (only ≡ 1 mod 8)"),
            "{line}"
        );
        assert!(describe(&fast, &reference, &[4, 15], 1e-2).contains("not comparable"));
    }
}

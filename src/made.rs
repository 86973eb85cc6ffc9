//! MADE's masks (Germain, Gregor, Murray & Larochelle 2015, "MADE: Masked Autoencoder for
//! Distribution Estimation", section 4), the autoregressive structure of an inverse
//! autoregressive flow step (Kingma et al. 2016, Algorithm 1): its outputs m_i and s_i depend on
//! z_j only for j < i, in the step's order. Both engines read the masks from here.
//!
//! Degrees: input j (0-based) has degree j + 1. A hidden unit k of `width` has degree
//! 1 + floor(k (Z - 1) / width) for Z > 1, so the degrees ascend through 1..Z-1, each about
//! equally often; for Z = 1 every hidden unit has degree 0 (it reads the context alone). A unit
//! of degree b reads a unit of degree a iff b >= a; output i (degree i + 1, for m_i and for s_i)
//! reads hidden unit k iff i + 1 > degree(k).
//!
//! Because the degrees ascend, the connected units of each row of a weight stored (in, out) are
//! a suffix of its columns: `Masks` keeps where each row's suffix starts, a structure rather
//! than a dense 0/1 matrix, and the candle model builds its dense masks from the same starts.

/// s's offset before the sigmoid of an IAF step, sigma = sigmoid(s + SHIFT): a step starts near
/// the identity, sigma about sigmoid(1.5) = 0.82 (the paper asks for a positive bias on s "so
/// that sigma starts close to 1"; the PyTorch peer adds this constant).
pub const SHIFT: f32 = 1.5;

/// Where each row's connected columns start, for the three masked layers of a MADE with two
/// hidden layers of `width` units on z of `zd` dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masks {
    pub zd: usize,
    pub width: usize,
    /// Input j -> first hidden unit: row j of W1 (zd, width) is connected from column `l1[j]`.
    pub l1: Vec<usize>,
    /// First-layer unit k -> second layer: row k of W2 (width, width) from column `l2[k]`.
    pub l2: Vec<usize>,
    /// Second-layer unit k -> outputs: row k of Wo (width, 2 zd) from column `out[k]` in each
    /// half (m's columns 0..zd, s's zd..2 zd).
    pub out: Vec<usize>,
}

/// The degree of hidden unit `k` of `width` over `zd` inputs.
pub fn hidden_degree(k: usize, zd: usize, width: usize) -> usize {
    if zd > 1 {
        1 + k * (zd - 1) / width
    } else {
        0
    }
}

impl Masks {
    pub fn new(zd: usize, width: usize) -> Masks {
        let deg: Vec<usize> = (0..width).map(|k| hidden_degree(k, zd, width)).collect();
        // The first unit whose degree is at least d (width if none).
        let first = |d: usize| deg.iter().position(|&b| b >= d).unwrap_or(width);
        Masks {
            zd,
            width,
            l1: (0..zd).map(|j| first(j + 1)).collect(),
            l2: deg.iter().map(|&a| first(a)).collect(),
            // Output i reads unit k iff i + 1 > deg(k), i.e. i >= deg(k).
            out: deg.clone(),
        }
    }

    /// Dense 0/1 masks in the checkpoint's (out, in) layout: W1 (width, zd), W2 (width, width),
    /// Wo (2 zd, width); the candle model multiplies its weights by them.
    pub fn dense(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (z, w) = (self.zd, self.width);
        let mut m1 = vec![0f32; w * z];
        for (j, &s) in self.l1.iter().enumerate() {
            for k in s..w {
                m1[k * z + j] = 1.0;
            }
        }
        let mut m2 = vec![0f32; w * w];
        for (k1, &s) in self.l2.iter().enumerate() {
            for k2 in s..w {
                m2[k2 * w + k1] = 1.0;
            }
        }
        let mut mo = vec![0f32; 2 * z * w];
        for (k, &s) in self.out.iter().enumerate() {
            for i in s..z {
                mo[i * w + k] = 1.0;
                mo[(z + i) * w + k] = 1.0;
            }
        }
        (m1, m2, mo)
    }

    /// Zeroes the unconnected entries of the three weights stored (in, out) row-major: at
    /// initialization, and on their gradients, so that Adam never moves them off zero.
    pub fn apply(&self, w1: &mut [f32], w2: &mut [f32], wo: &mut [f32]) {
        let (z, w) = (self.zd, self.width);
        for (j, &s) in self.l1.iter().enumerate() {
            w1[j * w..j * w + s].fill(0.0);
        }
        for (k, &s) in self.l2.iter().enumerate() {
            w2[k * w..k * w + s].fill(0.0);
        }
        for (k, &s) in self.out.iter().enumerate() {
            let row = &mut wo[k * 2 * z..(k + 1) * 2 * z];
            row[..s.min(z)].fill(0.0);
            row[z..z + s.min(z)].fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degrees_and_starts_by_hand() {
        // Z = 3, width 4: degrees 1 + floor(2k / 4) = 1, 1, 2, 2.
        let m = Masks::new(3, 4);
        let deg: Vec<usize> = (0..4).map(|k| hidden_degree(k, 3, 4)).collect();
        assert_eq!(deg, vec![1, 1, 2, 2]);
        // z_0 (degree 1) feeds every unit, z_1 (degree 2) units 2 and 3, z_2 none.
        assert_eq!(m.l1, vec![0, 2, 4]);
        // Degree-1 units feed the whole second layer, degree-2 units its units 2 and 3.
        assert_eq!(m.l2, vec![0, 0, 2, 2]);
        // Degree-1 units feed outputs 1 and 2, degree-2 units output 2; output 0 reads none.
        assert_eq!(m.out, vec![1, 1, 2, 2]);
        // Z = 1: no input reaches a hidden unit; outputs read every (context-only) unit.
        let one = Masks::new(1, 3);
        assert_eq!((one.l1, one.out), (vec![3], vec![0, 0, 0]));
    }

    #[test]
    fn the_dense_masks_make_output_i_depend_on_earlier_inputs_only() {
        // Path counting: (Mo M2 M1)[i][j] > 0 iff some path joins input j to output i; that
        // must hold only for j < i, and (with width >= Z) for every j < i.
        for (z, w) in [(2, 3), (5, 7), (6, 6), (4, 20), (1, 4)] {
            let (m1, m2, mo) = Masks::new(z, w).dense();
            for half in 0..2 {
                for i in 0..z {
                    for j in 0..z {
                        let mut paths = 0.0;
                        for k2 in 0..w {
                            for k1 in 0..w {
                                paths +=
                                    mo[(half * z + i) * w + k2] * m2[k2 * w + k1] * m1[k1 * z + j];
                            }
                        }
                        assert_eq!(
                            paths > 0.0,
                            j < i,
                            "Z {z}, width {w}: output {i}, input {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn apply_zeroes_exactly_the_dense_masks_zeros() {
        let (z, w) = (4, 6);
        let m = Masks::new(z, w);
        let (d1, d2, dout) = m.dense();
        let (mut w1, mut w2, mut wo) =
            (vec![1f32; z * w], vec![1f32; w * w], vec![1f32; w * 2 * z]);
        m.apply(&mut w1, &mut w2, &mut wo);
        // (in, out) storage against the (out, in) dense masks.
        for j in 0..z {
            for k in 0..w {
                assert_eq!(w1[j * w + k], d1[k * z + j]);
            }
        }
        for k1 in 0..w {
            for k2 in 0..w {
                assert_eq!(w2[k1 * w + k2], d2[k2 * w + k1]);
            }
        }
        for k in 0..w {
            for o in 0..2 * z {
                assert_eq!(wo[k * 2 * z + o], dout[o * w + k]);
            }
        }
    }
}

//! Which bits this process's maths gives: the kernel fingerprint.
//!
//! The built-in models' matrix products run on fixed-order kernels ([`super::dense`]) whose bits
//! do not depend on the CPU's SIMD features. What can still differ between machines is `exp`
//! and `ln`, from the platform's libm (in the classification head), and a different build of
//! the kernels themselves. Two nodes whose maths differs compute different gradients from the
//! same inputs, and a job whose trainers run on both would end with bits no fault-free run on
//! either machine gives.
//!
//! So the maths in use is **measured, not guessed**: [`fingerprint`] runs the models' own
//! helpers — the kernels' two kinds of sum (linear combinations and lane dots, on shapes that
//! reach their blocks' edges) and the softmax cross-entropy head (`exp`, `ln`) — on fixed
//! inputs whose results depend on the rounding, and hashes the bits of the results. Equal
//! fingerprints mean the same bits on these probes; a node whose fingerprint differs from the
//! job's refuses to host the job's actors, and a checkpoint written under another fingerprint
//! is not restored (see the runtime's docs).
//!
//! ```
//! use phalanx_actors::model::kernel;
//!
//! let here = kernel::fingerprint();
//! assert_eq!(here, kernel::fingerprint(), "computed once, the same for the whole process");
//! assert!(kernel::check(here).is_ok());
//! println!("kernel {here} ({})", kernel::description());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// The hash of the bits the maths of this process gives on fixed probes (see the module docs).
/// Shown and parsed as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelFingerprint(pub u64);

impl fmt::Display for KernelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for KernelFingerprint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("kernel fingerprint {text:?} is not 16 hex digits"));
        }
        u64::from_str_radix(text, 16).map(Self).map_err(|e| format!("kernel fingerprint {text:?}: {e}"))
    }
}

/// A job's kernel is not this process's: hosting its actors here would give other bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelMismatch {
    /// The fingerprint the job runs with.
    pub job: KernelFingerprint,
    /// This process's.
    pub here: KernelFingerprint,
}

impl fmt::Display for KernelMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the job computes with kernel {} but this machine's maths has kernel {} ({}): its gradients would \
             not have the job's bits; run the job on machines of one CPU kind (same SIMD features and libm)",
            self.job,
            self.here,
            description()
        )
    }
}

impl std::error::Error for KernelMismatch {}

/// This process's fingerprint, once measured (or, in a fault-injection build, pretended).
static HERE: OnceLock<KernelFingerprint> = OnceLock::new();

/// This process's kernel fingerprint, computed on first use (well under a millisecond).
pub fn fingerprint() -> KernelFingerprint {
    *HERE.get_or_init(measure)
}

/// Fault injection (tests of mixed clusters): make this process claim `fingerprint`, as a
/// machine whose maths rounds differently would. Must come before anything asks for the
/// fingerprint; `Err` with the one already in use otherwise. A build without the cargo
/// feature `fault-injection` has no such function.
#[cfg(feature = "fault-injection")]
pub fn pretend(fingerprint: KernelFingerprint) -> Result<(), KernelFingerprint> {
    HERE.set(fingerprint).map_err(|_| self::fingerprint())
}

/// `Ok` if a job with kernel `job` may run its actors in this process.
pub fn check(job: KernelFingerprint) -> Result<(), KernelMismatch> {
    let here = fingerprint();
    if job == here {
        Ok(())
    } else {
        Err(KernelMismatch { job, here })
    }
}

/// What runs the maths here, for people reading an error: the architecture, its SIMD features
/// (which decide the kernels' speed, not their bits) and the OS. Informative only;
/// [`fingerprint`] is what is compared.
pub fn description() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let arch = std::env::consts::ARCH;
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            let features: Vec<&str> = [
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
                ("fma", std::arch::is_x86_feature_detected!("fma")),
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("avx", std::arch::is_x86_feature_detected!("avx")),
            ]
            .into_iter()
            .filter_map(|(name, present)| present.then_some(name))
            .collect();
            let features = if features.is_empty() { "sse2 only".to_string() } else { features.join("+") };
            format!("{arch} {features}, {}", std::env::consts::OS)
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        {
            format!("{arch}, {}", std::env::consts::OS)
        }
    })
}

/// FNV-1a, 64 bits, over 32-bit words: a small, fixed hash (no std hasher, whose output may
/// change between Rust versions).
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn word(&mut self, word: u32) {
        for byte in word.to_le_bytes() {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(Self::PRIME);
        }
    }

    fn f32s<'a>(&mut self, values: impl IntoIterator<Item = &'a f32>) {
        for value in values {
            self.word(value.to_bits());
        }
    }
}

/// Fixed probe values in `[-1, 1)` times a power of two in `[1/8, 8]`: products of these
/// do not fit in an `f32` exactly, so a fused multiply-add and a multiply-then-add round them
/// differently (see the test that shows it).
fn probe_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|i| {
            // xorshift64*: fixed, platform-independent integer maths.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
            let unit = bits as f32 / (1u32 << 23) as f32 - 1.0;
            unit * [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0][i % 7]
        })
        .collect()
}

/// The probe shapes `(m, k, n)`: odd row counts (the kernels take rows in pairs), widths
/// across the kernels' 32- and 64-column blocks with a tail and below one block, widths that are not a
/// multiple of the lane dot's 8 lanes, and a long inner dimension.
const PROBE_SHAPES: [(usize, usize, usize); 4] = [(37, 29, 23), (3, 5, 2), (9, 130, 17), (5, 11, 75)];

fn measure() -> KernelFingerprint {
    let mut hash = Fnv(Fnv::OFFSET);
    for (index, &(m, k, n)) in PROBE_SHAPES.iter().enumerate() {
        let seed = 0x9e37_79b9_7f4a_7c15 ^ index as u64;
        let a = probe_values(m * k, seed);
        let b = probe_values(k * n, seed.rotate_left(17));
        // c = a·b (a linear combination per element), then aᵀ·c (sums over rows), then the
        // lane dot of c's rows with (aᵀ·c)'s: every kind of sum the models make.
        let mut c = vec![f32::NAN; m * n];
        super::dense::matmul_rows(&a, k, &b, n, 0, &mut c, n);
        hash.f32s(c.iter());
        let mut t = vec![f32::NAN; k * n];
        super::dense::matmul_tn(&a, k, &c, n, &mut t);
        hash.f32s(t.iter());
        let mut dot = super::dense::LaneDot::new(m, k);
        dot.add(&c, &t, n);
        let mut dots = vec![f32::NAN; m * k];
        dot.finish(&probe_values(k, seed ^ 1), &mut dots);
        hash.f32s(dots.iter());
    }
    // The classification head: exp on every logit, ln of every row's sum.
    let mut logits = Array2::from_shape_vec((8, 5), probe_values(40, 0x0123_4567_89ab_cdef)).expect("8 × 5 logits");
    logits.mapv_inplace(|z| z * 7.0);
    let labels: Vec<u32> = (0..8).map(|i| i % 5).collect();
    let loss = super::softmax_ce_head(logits.view_mut(), &labels, true);
    hash.f32s(logits.iter());
    let bits = loss.to_bits();
    hash.word(bits as u32);
    hash.word((bits >> 32) as u32);
    KernelFingerprint(hash.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_stable_and_prints_as_16_hex_digits() {
        let here = measure();
        assert_eq!(here, measure(), "two measurements in one process agree");
        assert_eq!(here, fingerprint());
        let text = here.to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(text.parse::<KernelFingerprint>(), Ok(here));
        assert!("0123".parse::<KernelFingerprint>().is_err());
        assert!("0123456789abcdeg".parse::<KernelFingerprint>().is_err());
        assert!("+123456789abcdef".parse::<KernelFingerprint>().is_err());
    }

    /// The probes tell a fused multiply-add kernel from a multiply-then-add one: on the probe
    /// values the two roundings of the same sums, in the same order, differ. (Were the probe
    /// products exact, every kernel would hash alike and the check would be blind.)
    #[test]
    fn the_probes_see_how_a_kernel_rounds() {
        let (m, k, n) = PROBE_SHAPES[0];
        let a = probe_values(m * k, 1);
        let b = probe_values(k * n, 2);
        let product = |fused: bool| {
            let mut out = Fnv(Fnv::OFFSET);
            for i in 0..m {
                for j in 0..n {
                    let mut sum = 0.0f32;
                    for l in 0..k {
                        let (x, y) = (a[i * k + l], b[l * n + j]);
                        sum = if fused { x.mul_add(y, sum) } else { x * y + sum };
                    }
                    out.word(sum.to_bits());
                }
            }
            out.0
        };
        assert_ne!(product(true), product(false), "fused and unfused sums have the same bits on the probes");
    }

    #[test]
    fn a_mismatch_names_both_kernels_and_this_machine() {
        let here = fingerprint();
        let job = KernelFingerprint(here.0 ^ 1);
        let err = check(job).unwrap_err();
        assert_eq!(err, KernelMismatch { job, here });
        let text = err.to_string();
        assert!(text.contains(&job.to_string()) && text.contains(&here.to_string()), "{text}");
        assert!(text.contains(description()), "{text}");
        assert!(check(here).is_ok());
    }
}

//! Seeded, reproducible random input for the host fuzz tests, on the stable
//! toolchain (no cargo-fuzz).
//!
//! Each fuzz test asks for a [`FuzzRun`]: under `cargo test` it runs a
//! short, fixed number of cases from a fixed seed; `make fuzz` sets
//! `STORDOM_FUZZ_SECS` and the test keeps generating cases for that long.
//! The seed is printed at the start; `STORDOM_FUZZ_SEED=<seed>` replays a
//! failure exactly (same seed, same cases, in the same order).

use std::time::{Duration, Instant};
use std::vec::Vec;

/// Seconds each fuzz test runs for instead of its short case count.
pub const FUZZ_SECS_ENV: &str = "STORDOM_FUZZ_SECS";
/// The seed to start from (decimal or `0x` hex) instead of the test's own.
pub const FUZZ_SEED_ENV: &str = "STORDOM_FUZZ_SEED";

/// xorshift64*: small, fast, reproducible, no dependency.
#[derive(Clone, Debug)]
pub struct FuzzRng(u64);

impl FuzzRng {
    /// A generator from `seed` (0 is replaced: xorshift never leaves it).
    pub fn new(seed: u64) -> Self {
        FuzzRng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// One of `choices` (not empty).
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len() as u64) as usize]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Overwrites `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        buf.iter_mut().for_each(|b| *b = self.next_u64() as u8);
    }
}

/// How long one fuzz test runs and from which seed.
pub struct FuzzRun {
    name: &'static str,
    seed: u64,
    short_cases: u64,
    deadline: Option<Instant>,
    cases: u64,
    started: Instant,
}

impl FuzzRun {
    /// The run of test `name`: `short_cases` cases from `default_seed`,
    /// unless the environment asks for a long run or another seed.
    pub fn new(name: &'static str, default_seed: u64, short_cases: u64) -> Self {
        let seed = std::env::var(FUZZ_SEED_ENV)
            .ok()
            .and_then(|s| parse_seed(&s))
            .unwrap_or(default_seed);
        let secs = std::env::var(FUZZ_SECS_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let started = Instant::now();
        let deadline = secs.map(|s| started + Duration::from_secs(s));
        println!("fuzz {name}: seed {seed:#x} (replay: {FUZZ_SEED_ENV}={seed:#x})");
        FuzzRun {
            name,
            seed,
            short_cases,
            deadline,
            cases: 0,
            started,
        }
    }

    /// The generator for the whole run.
    pub fn rng(&self) -> FuzzRng {
        FuzzRng::new(self.seed)
    }

    /// Whether to run one more case (and counts it).
    pub fn another(&mut self) -> bool {
        let more = match self.deadline {
            Some(deadline) => Instant::now() < deadline,
            None => self.cases < self.short_cases,
        };
        if more {
            self.cases += 1;
        } else {
            self.report();
        }
        more
    }

    fn report(&self) {
        let (name, cases, seed) = (self.name, self.cases, self.seed);
        let secs = self.started.elapsed().as_secs_f64();
        println!("fuzz {name}: {cases} cases in {secs:.1} s from seed {seed:#x}");
    }
}

fn parse_seed(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex_and_replay_the_same_numbers() {
        assert_eq!(parse_seed("0x1f"), Some(31));
        assert_eq!(parse_seed(" 42 "), Some(42));
        assert_eq!(parse_seed("x"), None);
        let (mut a, mut b) = (FuzzRng::new(5), FuzzRng::new(5));
        assert_eq!(a.bytes(16), b.bytes(16));
        assert_ne!(FuzzRng::new(0).next_u64(), 0);
    }
}

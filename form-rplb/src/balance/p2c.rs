//! Power of two choices: pick two candidates at random, take the one with fewer requests
//! in flight (ties: the first). Nearly as even as least-loaded, at the cost of two looks.

/// A small, fast PRNG (xorshift64*) for picking candidates; not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Index into `in_flight` of the chosen candidate, or `None` when it is empty.
pub fn pick(in_flight: &[u64], rng: &mut Rng) -> Option<usize> {
    match in_flight.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = rng.below(n);
            let mut b = rng.below(n - 1);
            if b >= a {
                b += 1;
            }
            Some(if in_flight[b] < in_flight[a] { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busier_of_two_loses() {
        let mut rng = Rng::new(7);
        // With two backends both are always the candidates: the idle one wins.
        for _ in 0..100 {
            assert_eq!(pick(&[5, 0], &mut rng), Some(1));
        }
        assert_eq!(pick(&[], &mut rng), None);
        assert_eq!(pick(&[3], &mut rng), Some(0));
    }

    #[test]
    fn load_evens_out() {
        let mut rng = Rng::new(42);
        let mut load = vec![0u64; 10];
        for _ in 0..10_000 {
            let i = pick(&load, &mut rng).expect("pick");
            load[i] += 1;
        }
        let (min, max) = (
            load.iter().min().copied().unwrap_or(0),
            load.iter().max().copied().unwrap_or(0),
        );
        assert!(max - min <= 2, "{load:?}");
    }
}

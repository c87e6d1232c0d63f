//! Learning-rate schedulers: MXNet 1.9.1's `FactorScheduler`,
//! `MultiFactorScheduler`, `PolyScheduler` and `CosineScheduler`, with
//! their warm-up, giving the same f64 learning rate for every update count.
//!
//! MXNet's schedulers are objects with state that its optimizer calls with
//! `num_update`, the most updates any key has had (counts start at
//! `begin_num_update`). Here a scheduler is a value and the rate a function
//! of `num_update`; since `num_update` grows by at most one per update,
//! every count from the first one on is seen, which is what makes MXNet's
//! stateful results a function of the count alone.
//!
//! Two quirks of MXNet are kept, because a model trained with pskv should
//! see the rates it would under MXNet with `mx.optimizer.create(...,
//! learning_rate=lr, lr_scheduler=s)`:
//! - Factor and MultiFactor decay from the optimizer's learning rate (the
//!   optimizer overwrites the scheduler's `base_lr`); Poly and Cosine decay
//!   from the scheduler's own `base_lr`, which they copied before that.
//! - Warm-up rises to the scheduler's own `base_lr`.

use crate::error::{KvError, Result};

/// How warm-up moves from `begin_lr` to the scheduler's `base_lr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WarmupMode {
    /// In equal steps.
    Linear,
    /// `begin_lr` throughout.
    Constant,
}

/// The first updates' rates, before the schedule proper.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Warmup {
    /// Updates in warm-up (counts `0..steps`).
    pub steps: u64,
    /// The rate at count 0.
    pub begin_lr: f64,
    /// Linear or constant.
    pub mode: WarmupMode,
}

/// The decay rule.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Decay {
    /// Times `factor` every `step` updates, never below `stop_factor_lr`.
    Factor {
        /// Updates between changes (at least 1).
        step: u64,
        /// At most 1.
        factor: f64,
        /// The floor.
        stop_factor_lr: f64,
    },
    /// Times `factor` after each count in `steps` (increasing, from 1).
    MultiFactor {
        /// The counts after which the rate drops.
        steps: Vec<u64>,
        /// At most 1.
        factor: f64,
    },
    /// `final_lr + (base_lr - final_lr) * (1 - x)^pwr`, x the fraction of
    /// updates after warm-up done, until `max_update`.
    Poly {
        /// The count at which the decay ends.
        max_update: u64,
        /// The power.
        pwr: f64,
        /// The last rate.
        final_lr: f64,
    },
    /// `final_lr + (base_lr - final_lr) * (1 + cos(pi x)) / 2`, until
    /// `max_update`.
    Cosine {
        /// The count at which the decay ends.
        max_update: u64,
        /// The last rate.
        final_lr: f64,
    },
}

/// A learning-rate scheduler.
///
/// ```
/// use pskv_kvstore::{LrScheduler, Optimizer};
/// // MXNet: FactorScheduler(step=100, factor=0.9, warmup_steps=10)
/// let s = LrScheduler::factor(100, 0.9).warmup(10, 0.0);
/// let opt = Optimizer::sgd(0.1).momentum(0.9).lr_scheduler(s);
/// assert!(opt.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrScheduler {
    /// The rule.
    pub decay: Decay,
    /// The scheduler's own base rate (MXNet's `base_lr` argument, 0.01 by
    /// default): Poly and Cosine decay from it, and warm-up rises to it.
    pub base_lr: f64,
    /// Warm-up, if any.
    pub warmup: Option<Warmup>,
}

impl LrScheduler {
    fn with(decay: Decay) -> LrScheduler {
        LrScheduler {
            decay,
            base_lr: 0.01,
            warmup: None,
        }
    }

    /// MXNet's `FactorScheduler(step, factor)` (`stop_factor_lr` 1e-8).
    pub fn factor(step: u64, factor: f64) -> LrScheduler {
        LrScheduler::with(Decay::Factor {
            step,
            factor,
            stop_factor_lr: 1e-8,
        })
    }

    /// MXNet's `MultiFactorScheduler(step, factor)`.
    pub fn multi_factor(steps: Vec<u64>, factor: f64) -> LrScheduler {
        LrScheduler::with(Decay::MultiFactor { steps, factor })
    }

    /// MXNet's `PolyScheduler(max_update, base_lr, pwr)` (`final_lr` 0).
    pub fn poly(max_update: u64, base_lr: f64, pwr: f64) -> LrScheduler {
        LrScheduler {
            base_lr,
            ..LrScheduler::with(Decay::Poly {
                max_update,
                pwr,
                final_lr: 0.0,
            })
        }
    }

    /// MXNet's `CosineScheduler(max_update, base_lr)` (`final_lr` 0).
    pub fn cosine(max_update: u64, base_lr: f64) -> LrScheduler {
        LrScheduler {
            base_lr,
            ..LrScheduler::with(Decay::Cosine {
                max_update,
                final_lr: 0.0,
            })
        }
    }

    /// Sets the scheduler's own base rate.
    pub fn base_lr(mut self, lr: f64) -> LrScheduler {
        self.base_lr = lr;
        self
    }

    /// Sets the last rate (Poly, Cosine) or the floor (Factor).
    pub fn final_lr(mut self, lr: f64) -> LrScheduler {
        match &mut self.decay {
            Decay::Poly { final_lr, .. } | Decay::Cosine { final_lr, .. } => *final_lr = lr,
            Decay::Factor { stop_factor_lr, .. } => *stop_factor_lr = lr,
            Decay::MultiFactor { .. } => {}
        }
        self
    }

    /// A linear warm-up over `steps` updates from `begin_lr`.
    pub fn warmup(mut self, steps: u64, begin_lr: f64) -> LrScheduler {
        self.warmup = Some(Warmup {
            steps,
            begin_lr,
            mode: WarmupMode::Linear,
        });
        self
    }

    /// A constant warm-up: `begin_lr` for `steps` updates.
    pub fn constant_warmup(mut self, steps: u64, begin_lr: f64) -> LrScheduler {
        self.warmup = Some(Warmup {
            steps,
            begin_lr,
            mode: WarmupMode::Constant,
        });
        self
    }

    /// Parses `kind(name=value;...)`, with MXNet's class and argument
    /// names: `factor(step=100;factor=0.9;stop_factor_lr=1e-8)`,
    /// `multifactor(step=30:60:90;factor=0.1)`,
    /// `poly(max_update=1000;base_lr=0.1;pwr=2;final_lr=0)`,
    /// `cosine(max_update=1000;base_lr=0.1;final_lr=0)`, each also taking
    /// `base_lr`, `warmup_steps`, `warmup_begin_lr` and `warmup_mode`
    /// (`linear` or `constant`). (The C ABI passes schedulers this way.)
    pub fn parse(spec: &str) -> Result<LrScheduler> {
        let bad = |why: String| KvError::invalid(format!("lr_scheduler '{spec}': {why}"));
        let spec_t = spec.trim();
        let (kind, args) = match spec_t.split_once('(') {
            Some((k, rest)) => {
                let args = rest
                    .strip_suffix(')')
                    .ok_or_else(|| bad("expected kind(name=value;...)".into()))?;
                (k.trim().to_ascii_lowercase(), args)
            }
            None => (spec_t.to_ascii_lowercase(), ""),
        };
        let mut pairs: Vec<(String, String)> = Vec::new();
        for p in args.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| bad(format!("'{p}': expected name=value")))?;
            pairs.push((k.trim().to_string(), v.trim().to_string()));
        }
        // The last value given for `name`.
        let raw = |name: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        // `v`, the value of `name`, as a T ("a number", "a whole number").
        fn parse<T: std::str::FromStr>(
            v: &str,
            name: &str,
            what: &str,
            bad: &dyn Fn(String) -> KvError,
        ) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| bad(format!("{name}: '{v}' is not {what}")))
        }
        let num = |name: &str| -> Result<Option<f64>> {
            raw(name)
                .map(|v| parse(v, name, "a number", &bad))
                .transpose()
        };
        let count = |name: &str| -> Result<Option<u64>> {
            raw(name)
                .map(|v| parse(v, name, "a whole number", &bad))
                .transpose()
        };
        let need = |name: &str, v: Option<u64>| v.ok_or_else(|| bad(format!("{name} is required")));
        let known: &[&str] = match kind.as_str() {
            "factor" => &["step", "factor", "stop_factor_lr"],
            "multifactor" | "multi_factor" => &["step", "factor"],
            "poly" => &["max_update", "pwr", "final_lr"],
            "cosine" => &["max_update", "final_lr"],
            other => {
                return Err(bad(format!(
                    "unknown kind '{other}': expected factor, multifactor, poly or cosine"
                )))
            }
        };
        let common = ["base_lr", "warmup_steps", "warmup_begin_lr", "warmup_mode"];
        if let Some((k, _)) = pairs
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()) && !common.contains(&k.as_str()))
        {
            return Err(bad(format!("{kind} has no argument '{k}'")));
        }
        let mut s = match kind.as_str() {
            "factor" => {
                let mut s = LrScheduler::factor(
                    need("step", count("step")?)?,
                    num("factor")?.unwrap_or(1.0),
                );
                if let Some(v) = num("stop_factor_lr")? {
                    s = s.final_lr(v);
                }
                s
            }
            "poly" => {
                let mut s = LrScheduler::poly(
                    need("max_update", count("max_update")?)?,
                    0.01,
                    num("pwr")?.unwrap_or(2.0),
                );
                if let Some(v) = num("final_lr")? {
                    s = s.final_lr(v);
                }
                s
            }
            "cosine" => {
                let mut s = LrScheduler::cosine(need("max_update", count("max_update")?)?, 0.01);
                if let Some(v) = num("final_lr")? {
                    s = s.final_lr(v);
                }
                s
            }
            _ => {
                let steps = raw("step")
                    .ok_or_else(|| bad("step is required".into()))?
                    .split(':')
                    .map(|x| parse(x, "step", "a whole number", &bad))
                    .collect::<Result<Vec<u64>>>()?;
                LrScheduler::multi_factor(steps, num("factor")?.unwrap_or(1.0))
            }
        };
        if let Some(v) = num("base_lr")? {
            s = s.base_lr(v);
        }
        let steps = count("warmup_steps")?.unwrap_or(0);
        let begin = num("warmup_begin_lr")?.unwrap_or(0.0);
        // MXNet checks this with or without warm-up steps.
        if begin > s.base_lr {
            return Err(bad(format!(
                "warmup_begin_lr {begin} is above base_lr {}",
                s.base_lr
            )));
        }
        s.warmup = match raw("warmup_mode") {
            None | Some("linear") => (steps > 0).then_some(Warmup {
                steps,
                begin_lr: begin,
                mode: WarmupMode::Linear,
            }),
            Some("constant") => (steps > 0).then_some(Warmup {
                steps,
                begin_lr: begin,
                mode: WarmupMode::Constant,
            }),
            Some(m) => {
                return Err(bad(format!(
                    "warmup_mode '{m}': expected linear or constant"
                )))
            }
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks what MXNet's constructors check, and what would divide by
    /// zero there.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(KvError::invalid(format!("lr_scheduler: {why}")));
        let mut finite = vec![("base_lr", self.base_lr)];
        if let Some(w) = &self.warmup {
            finite.push(("warmup_begin_lr", w.begin_lr));
            if w.begin_lr > self.base_lr {
                return bad(format!(
                    "warmup_begin_lr {} is above base_lr {}",
                    w.begin_lr, self.base_lr
                ));
            }
        }
        let warm = self.warmup_steps();
        match &self.decay {
            Decay::Factor {
                step,
                factor,
                stop_factor_lr,
            } => {
                if *step < 1 {
                    return bad("step must be at least 1".into());
                }
                if *factor > 1.0 {
                    return bad(format!("factor {factor} is above 1"));
                }
                finite.extend([("factor", *factor), ("stop_factor_lr", *stop_factor_lr)]);
            }
            Decay::MultiFactor { steps, factor } => {
                if steps.is_empty() || steps[0] < 1 || steps.windows(2).any(|w| w[1] <= w[0]) {
                    return bad(format!("steps {steps:?} must be increasing counts from 1"));
                }
                if *factor > 1.0 {
                    return bad(format!("factor {factor} is above 1"));
                }
                finite.push(("factor", *factor));
            }
            Decay::Poly {
                max_update,
                pwr,
                final_lr,
            } => {
                if *max_update == warm {
                    // MXNet divides by max_update - warmup_steps.
                    return bad(format!(
                        "max_update {max_update} equals the warm-up steps (nothing to decay over)"
                    ));
                }
                finite.extend([("pwr", *pwr), ("final_lr", *final_lr)]);
            }
            Decay::Cosine {
                max_update,
                final_lr,
            } => {
                if *max_update == warm {
                    // MXNet divides by max_update - warmup_steps.
                    return bad(format!(
                        "max_update {max_update} equals the warm-up steps (nothing to decay over)"
                    ));
                }
                finite.push(("final_lr", *final_lr));
            }
        }
        for (what, v) in finite {
            if !v.is_finite() {
                return bad(format!("{what} = {v} is not finite"));
            }
        }
        Ok(())
    }

    fn warmup_steps(&self) -> u64 {
        self.warmup.map_or(0, |w| w.steps)
    }

    /// The rate MXNet's scheduler returns for `num_update`, in an optimizer
    /// whose learning rate is `opt_lr` and whose counts start at `begin`.
    /// `memo` caches Factor's furthest (changes, rate), which it would
    /// otherwise recompute one multiplication per change.
    pub(crate) fn lr(&self, num_update: u64, opt_lr: f64, begin: u64, memo: &mut Memo) -> f64 {
        if let Some(w) = self.warmup.filter(|w| num_update < w.steps) {
            return match w.mode {
                WarmupMode::Linear => {
                    let increase = (self.base_lr - w.begin_lr) * num_update as f64 / w.steps as f64;
                    w.begin_lr + increase
                }
                WarmupMode::Constant => w.begin_lr,
            };
        }
        let warm = self.warmup_steps();
        match &self.decay {
            Decay::Factor {
                step,
                factor,
                stop_factor_lr,
            } => {
                // MXNet: while n > count + step: count += step; lr *= factor,
                // floored at stop_factor_lr.
                let changes = num_update.saturating_sub(1) / step;
                // Start from the memo if it is of this rate and not past
                // `changes` (counts seen out of order do not move it back).
                let (mut k, mut lr) = match memo.0 {
                    Some((k, lr, bits)) if bits == opt_lr.to_bits() && k <= changes => (k, lr),
                    _ => (0, opt_lr),
                };
                let stop = *stop_factor_lr;
                // With these signs a floored rate stays floored, and a factor
                // of 1 changes nothing: the loop may end at once.
                let settles = (0.0..=1.0).contains(factor) && stop >= 0.0;
                while k < changes {
                    if *factor == 1.0 && lr >= stop {
                        k = changes;
                        break;
                    }
                    lr *= factor;
                    if lr < stop {
                        lr = stop;
                    }
                    k += 1;
                    if settles && lr == stop {
                        k = changes;
                    }
                }
                if memo
                    .0
                    .is_none_or(|(mk, _, bits)| k >= mk || bits != opt_lr.to_bits())
                {
                    memo.0 = Some((k, lr, opt_lr.to_bits()));
                }
                lr
            }
            Decay::MultiFactor { steps, factor } => {
                let mut lr = opt_lr;
                for _ in steps.iter().take_while(|&&s| num_update > s) {
                    lr *= factor;
                }
                lr
            }
            Decay::Poly {
                max_update,
                pwr,
                final_lr,
            } => match decay_point(num_update, *max_update, warm, begin) {
                Some(n) => {
                    let x = 1.0 - (n - warm) as f64 / (*max_update - warm) as f64;
                    final_lr + (self.base_lr - final_lr) * x.powf(*pwr)
                }
                None => opt_lr,
            },
            Decay::Cosine {
                max_update,
                final_lr,
            } => match decay_point(num_update, *max_update, warm, begin) {
                Some(n) => {
                    let x = std::f64::consts::PI * (n - warm) as f64 / (*max_update - warm) as f64;
                    final_lr + (self.base_lr - final_lr) * (1.0 + x.cos()) / 2.0
                }
                None => opt_lr,
            },
        }
    }
}

/// Factor's furthest computed point: (changes, rate, the optimizer rate's
/// bits it started from).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Memo(Option<(u64, f64, u64)>);

/// The count whose rate Poly and Cosine return at `n` (past warm-up): `n`
/// itself up to `max_update`; after it, the last count decayed at, which is
/// `max_update` if counts from `begin + 1` on reached it past warm-up. None
/// if no count was ever decayed at: MXNet then returns its untouched base
/// rate, the optimizer's learning rate.
fn decay_point(n: u64, max_update: u64, warm: u64, begin: u64) -> Option<u64> {
    if n <= max_update {
        Some(n)
    } else if max_update >= warm.max(begin + 1) {
        Some(max_update)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lrs(s: &LrScheduler, opt_lr: f64, upto: u64) -> Vec<f64> {
        let mut memo = Memo::default();
        (1..=upto).map(|n| s.lr(n, opt_lr, 0, &mut memo)).collect()
    }

    #[test]
    fn factor_steps_down_and_stops_at_its_floor() {
        let s = LrScheduler::factor(2, 0.5).final_lr(0.2);
        assert_eq!(lrs(&s, 1.0, 7), vec![1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2]);
        // The memo gives the same rates out of order as in order.
        let mut memo = Memo::default();
        assert_eq!(s.lr(5, 1.0, 0, &mut memo), 0.25);
        assert_eq!(s.lr(3, 1.0, 0, &mut memo), 0.5);
        assert_eq!(s.lr(1_000_000_000, 1.0, 0, &mut memo), 0.2);
    }

    #[test]
    fn warmup_rises_to_the_schedulers_own_base() {
        let s = LrScheduler::factor(10, 0.5).base_lr(0.4).warmup(4, 0.0);
        let got = lrs(&s, 1.0, 5);
        assert_eq!(got, vec![0.1, 0.2, 0.30000000000000004, 1.0, 1.0]);
    }

    #[test]
    fn poly_and_cosine_hold_their_last_rate_after_max_update() {
        let p = LrScheduler::poly(4, 1.0, 2.0);
        assert_eq!(lrs(&p, 9.0, 6), vec![0.5625, 0.25, 0.0625, 0.0, 0.0, 0.0]);
        let c = LrScheduler::cosine(2, 1.0).final_lr(0.5);
        let got = lrs(&c, 9.0, 3);
        assert_eq!(got[1], 0.5);
        assert_eq!(got[2], 0.5);
        // Never decayed (counts start past max_update): the optimizer's rate.
        let mut memo = Memo::default();
        assert_eq!(c.lr(5, 9.0, 4, &mut memo), 9.0);
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s = LrScheduler::parse("multifactor(step=2:5:6;factor=0.3;warmup_steps=2;warmup_mode=constant;warmup_begin_lr=0.003)").unwrap();
        assert_eq!(
            s.decay,
            Decay::MultiFactor {
                steps: vec![2, 5, 6],
                factor: 0.3
            }
        );
        assert_eq!(s.warmup.unwrap().mode, WarmupMode::Constant);
        for (spec, want) in [
            ("factor", "step is required"),
            ("factor(step=0)", "at least 1"),
            ("factor(step=2;factor=2)", "above 1"),
            ("factor(step=2;pwr=2)", "no argument 'pwr'"),
            ("multifactor(step=5:3)", "increasing"),
            (
                "poly(max_update=3;warmup_steps=3)",
                "equals the warm-up steps",
            ),
            ("cosine(max_update=x)", "not a whole number"),
            (
                "cosine(max_update=9;warmup_mode=sideways)",
                "linear or constant",
            ),
            ("step(max_update=9)", "unknown kind"),
            ("factor(step=2", "expected kind"),
            (
                "factor(step=2;base_lr=0.1;warmup_steps=2;warmup_begin_lr=0.5)",
                "above base_lr",
            ),
        ] {
            let err = LrScheduler::parse(spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }
}

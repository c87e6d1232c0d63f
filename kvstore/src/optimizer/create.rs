//! Building an optimizer from MXNet's names: the method by name, its
//! hyperparameters by MXNet's parameter names with MXNet's defaults, and
//! MXNet's other optimizer attributes taken, ignored or refused as pskv has
//! their meaning or not.

use super::schedule::LrScheduler;
use super::{Method, Optimizer};
use crate::error::{KvError, Result};

impl Optimizer {
    /// MXNet optimizer attributes that have no meaning here: accepted and
    /// ignored (with a logged warning naming them), so that an MXNet
    /// optimizer's attribute dictionary passes as it is. A name that is
    /// neither one of these nor a parameter is still an error (a typo).
    pub const IGNORED_MXNET_ATTRIBUTES: &'static [&'static str] = &[
        "aggregate_num",
        "use_fused_step",
        "param_idx2name",
        "idx2name",
        "param_dict",
        "sym",
    ];

    /// An optimizer by MXNet name (`sgd`, `nag`, `adam`, `adagrad`) and
    /// MXNet parameter names (`learning_rate`, `momentum`, `wd`,
    /// `rescale_grad`, `clip_gradient`, `beta1`, `beta2`, `epsilon`,
    /// `eps`, `multi_precision` as 0/1), with MXNet's defaults. MXNet's
    /// attributes are accepted where pskv has their meaning: `lazy_update`
    /// (1: a row-sparse push updates only its rows, which is what pskv
    /// does; 0 is refused), `float_stable_eps` (AdaGrad's epsilon); those
    /// of [`Optimizer::IGNORED_MXNET_ATTRIBUTES`] are ignored with a
    /// warning.
    pub fn create(name: &str, params: &[(&str, f64)]) -> Result<Optimizer> {
        let mut opt = match name.to_ascii_lowercase().as_str() {
            "sgd" => Optimizer::sgd(0.01),
            "nag" => Optimizer::nag(0.01, 0.0),
            "adam" => Optimizer::adam(0.001),
            "adagrad" => Optimizer::adagrad(0.01),
            other => {
                return Err(KvError::invalid(format!(
                    "unknown optimizer '{other}': expected sgd, nag, adam or adagrad"
                )))
            }
        };
        for &(k, v) in params {
            opt = match k {
                "learning_rate" | "lr" => Optimizer {
                    learning_rate: v,
                    ..opt
                },
                "wd" => opt.wd(v),
                "rescale_grad" => opt.rescale_grad(v),
                "clip_gradient" => opt.clip_gradient(v),
                "multi_precision" => opt.multi_precision(v != 0.0),
                "begin_num_update" => {
                    if !(v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53)) {
                        return Err(KvError::invalid(format!(
                            "optimizer '{name}': begin_num_update = {v} is not a whole number from 0 to 2^53"
                        )));
                    }
                    opt.begin_num_update(v as u64)
                }
                "lazy_update" if v != 0.0 => opt,
                "lazy_update" => return Err(KvError::Unsupported {
                    what: format!("optimizer '{name}' with lazy_update = {v}"),
                    why:
                        "a row-sparse push updates only the rows it carries (MXNet's lazy update); \
                              a standard update of every row is not implemented"
                            .into(),
                }),
                "float_stable_eps" if matches!(opt.method, Method::AdaGrad(_)) => {
                    let set = opt.method.rule_mut().set("epsilon", v);
                    debug_assert!(set, "AdaGrad has an epsilon");
                    opt
                }
                other if opt.method.rule_mut().set(other, v) => opt,
                other
                    if other == "float_stable_eps"
                        || Optimizer::IGNORED_MXNET_ATTRIBUTES.contains(&other) =>
                {
                    tracing::warn!(
                        "optimizer '{name}': MXNet attribute '{other}' has no meaning in pskv; ignored"
                    );
                    opt
                }
                other => {
                    return Err(KvError::invalid(format!(
                        "optimizer '{name}' has no parameter '{other}'"
                    )))
                }
            };
        }
        opt.validate()?;
        Ok(opt)
    }

    /// An optimizer from MXNet's parameters as text, as the C ABI's
    /// `name=value` pairs and Python's keyword values give them: numbers by
    /// MXNet's names (as [`Optimizer::create`]), `lr_scheduler=KIND(...)`
    /// (as [`LrScheduler::parse`]), and the
    /// [`Optimizer::IGNORED_MXNET_ATTRIBUTES`] whatever their value (it need
    /// not be a number: MXNet's `param_idx2name` is a dict), ignored with a
    /// logged warning. The outer error is the text's (a value that is not a
    /// number, a scheduler that does not parse, two schedulers); the inner
    /// one the optimizer's (as [`Optimizer::create`]'s).
    pub fn from_text(name: &str, params: &[(&str, &str)]) -> Result<Result<Optimizer>> {
        let mut numbers = Vec::with_capacity(params.len());
        let mut scheduler = None;
        for &(k, v) in params {
            if k == "lr_scheduler" {
                if scheduler.is_some() {
                    return Err(KvError::invalid("lr_scheduler is given twice"));
                }
                let s = LrScheduler::parse(v).map_err(|e| {
                    KvError::invalid(format!(
                        "{e} (inside KIND(...), separate arguments with ';' and list steps with ':')"
                    ))
                })?;
                scheduler = Some(s);
                continue;
            }
            if Optimizer::IGNORED_MXNET_ATTRIBUTES.contains(&k) {
                tracing::warn!(
                    "optimizer '{name}': MXNet attribute '{k}' has no meaning in pskv; ignored"
                );
                continue;
            }
            let x: f64 = v.trim().parse().map_err(|_| {
                KvError::invalid(format!("optimizer parameter '{k}={v}': not a number"))
            })?;
            numbers.push((k, x));
        }
        Ok(match scheduler {
            Some(s) => Optimizer::create_scheduled(name, &numbers, s),
            None => Optimizer::create(name, &numbers),
        })
    }

    /// [`Optimizer::create`] with a scheduler, as MXNet's
    /// `mx.optimizer.create(name, lr_scheduler=s, **params)`: when `params`
    /// give no learning rate, SGD, NAG and AdaGrad (which have no default
    /// in MXNet) take the scheduler's `base_lr`; Adam keeps its 0.001.
    pub fn create_scheduled(
        name: &str,
        params: &[(&str, f64)],
        s: LrScheduler,
    ) -> Result<Optimizer> {
        let mut opt = Optimizer::create(name, params)?;
        let given = params
            .iter()
            .any(|(k, _)| *k == "learning_rate" || *k == "lr");
        if !given && !matches!(opt.method, Method::Adam(_)) {
            opt.learning_rate = s.base_lr;
        }
        let opt = opt.lr_scheduler(s);
        opt.validate()?;
        Ok(opt)
    }
}

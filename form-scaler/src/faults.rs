//! Fault injection for tests of rollback and restarts
//! (`--inject-fault STEP[=fail|hang|hold:FILE|skip_undo]`).
//! `fail`: the step runs, then reports an error once, so its undo must clean up real
//! work (a step after the commit is retried, and succeeds).
//! `hang`: the step is recorded, then never runs (a controller killed mid-operation).
//! `hold:FILE`: the step is recorded, then waits until FILE exists (a test does
//! something in that window, then creates FILE).
//! `skip_undo`: the step's undo does nothing (a broken rollback, for the checks that
//! must catch one).
//! Faults apply to forward steps (`skip_undo` to the step's undo), on every operation
//! of this controller.

use std::collections::HashMap;
use std::path::PathBuf;

use form_runtime::ConfigError;

use crate::ops::Step;

/// What an injected fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Run the step, then fail it.
    Fail,
    /// Stop before the step, forever.
    Hang,
    /// Wait before the step until this file exists.
    Hold(PathBuf),
    /// The step runs, but its undo does nothing and reports success: a deliberately
    /// broken rollback, which checks of what a platform runs must catch.
    SkipUndo,
}

/// The faults of this controller, by step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults(HashMap<Step, Fault>);

impl Faults {
    /// Parses `STEP[=fail|hang|hold:FILE]` entries; an unknown step or mode is an error naming it.
    pub fn parse(specs: &[String]) -> Result<Self, ConfigError> {
        let mut map = HashMap::new();
        for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (name, mode) = spec.split_once('=').unwrap_or((spec, "fail"));
            let step = Step::from_name(name).ok_or_else(|| {
                ConfigError::invalid(
                    "inject_fault",
                    format!("unknown step '{name}'; expected a step name such as clone_instances"),
                )
            })?;
            let fault = match mode.split_once(':') {
                None if mode == "fail" => Fault::Fail,
                None if mode == "hang" => Fault::Hang,
                None if mode == "skip_undo" => Fault::SkipUndo,
                Some(("hold", file)) if !file.is_empty() => Fault::Hold(PathBuf::from(file)),
                _ => {
                    return Err(ConfigError::invalid(
                        "inject_fault",
                        format!(
                            "unknown mode '{mode}' in '{spec}'; expected fail, hang, skip_undo or hold:FILE"
                        ),
                    ));
                }
            };
            map.insert(step, fault);
        }
        Ok(Self(map))
    }

    /// The fault at `step`, if any.
    pub fn at(&self, step: Step) -> Option<Fault> {
        self.0.get(&step).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_modes_and_names_what_is_wrong() {
        let f =
            Faults::parse(&["clone_instances".into(), "wait_healthy=hang".into()]).expect("valid");
        assert_eq!(f.at(Step::CloneInstances), Some(Fault::Fail));
        assert_eq!(f.at(Step::WaitHealthy), Some(Fault::Hang));
        assert_eq!(f.at(Step::AddMembers), None);
        let e = Faults::parse(&["clone".into()]).expect_err("unknown");
        assert!(e.to_string().contains("unknown step 'clone'"), "{e}");
        let e = Faults::parse(&["add_members=boom".into()]).expect_err("mode");
        assert!(
            e.to_string()
                .contains("expected fail, hang, skip_undo or hold:FILE"),
            "{e}"
        );
        let f = Faults::parse(&["add_members=hold:/tmp/go".into()]).expect("hold");
        assert_eq!(
            f.at(Step::AddMembers),
            Some(Fault::Hold(PathBuf::from("/tmp/go")))
        );
        assert!(Faults::parse(&["add_members=hold:".into()]).is_err());
    }
}

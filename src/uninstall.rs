//! `crosstrace uninstall`: deletes every TracingPolicy and, with `--wait`, waits until all are gone.
//!
//! Deleting a policy is how crosstrace reverts: the running controller restores every target of every
//! layer and only then removes its finalizer, so "all policies gone" means "nothing of crosstrace is left
//! in the workloads, the ingress controllers and Open vSwitch". The chart runs this as its `pre-delete`
//! hook: Helm runs pre-delete hooks before it deletes any of the release's objects, so the controller
//! (and the node agents) still run while it waits. It reads metadata only (a policy stored while the
//! CRD was looser is deleted like any other) and needs `list` and `delete` on `tracingpolicies`, nothing
//! else: it polls instead of watching, once a second, which costs nothing at this scale.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};

use crate::api::{FINALIZER, TracingPolicy};

/// `crosstrace uninstall` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct UninstallArgs {
    /// Wait until every TracingPolicy is gone (reverted by the controller, finalizer removed).
    #[arg(long)]
    pub wait: bool,
    /// How long to wait, e.g. 240s, 5m.
    #[arg(long, default_value = "240s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Parses `<n>s`, `<n>m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.strip_suffix('s') {
        Some(n) => (n, 1),
        None => text.strip_suffix('m').map_or((text, 1), |n| (n, 60)),
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| Duration::from_secs(n * unit))
        .ok_or_else(|| format!("{text:?} is not a duration such as 240s or 5m"))
}

/// Deletes every TracingPolicy and, when `args.wait`, waits until none is left; progress goes to `out`.
pub async fn run(client: Client, args: &UninstallArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let api: Api<TracingPolicy> = Api::all(client);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut reported: Option<Vec<String>> = None;
    loop {
        let left = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list.items,
            // No CRD, so no policy: nothing was ever changed.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                writeln!(out, "no TracingPolicy resource on this cluster: nothing to revert")?;
                return Ok(());
            }
            // Once waiting, a failed list is tried again until the deadline.
            Err(error) if reported.is_some() && tokio::time::Instant::now() < deadline => {
                writeln!(out, "listing TracingPolicies failed, trying again: {}", brief(&error))?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => return Err(error).context("listing TracingPolicies"),
        };
        // Deleted every time round: a policy created meanwhile goes too.
        for policy in left.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let name = policy.name_any();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => writeln!(out, "deleting TracingPolicy {name}")?,
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error).with_context(|| format!("deleting TracingPolicy {name}")),
            }
        }
        let mut names: Vec<String> = left.iter().map(ResourceExt::name_any).collect();
        names.sort();
        if names.is_empty() {
            writeln!(out, "no TracingPolicy left: crosstrace's changes are reverted")?;
            return Ok(());
        }
        if !args.wait {
            writeln!(out, "{} TracingPolicies deleting; the controller reverts them (not waiting)", names.len())?;
            return Ok(());
        }
        if reported.as_ref() != Some(&names) {
            writeln!(out, "waiting for the controller to revert and release {}: {}", names.len(), names.join(", "))?;
            reported = Some(names.clone());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{}", timeout_message(&names, args.timeout));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What went wrong, on one line: the API server's message when there is one.
fn brief(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// The one-line error when policies are still there at the deadline.
fn timeout_message(names: &[String], timeout: Duration) -> String {
    format!(
        "timed out after {}s: TracingPolicies still present (finalizer {FINALIZER}): {}. Is the crosstrace \
         controller running and holding its Lease? Its log says what a revert waits for. To remove crosstrace \
         without reverting: helm uninstall --no-hooks, then remove the finalizers",
        timeout.as_secs(),
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_minutes() {
        assert_eq!(parse_duration("240s"), Ok(Duration::from_secs(240)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn the_timeout_names_every_policy_left_on_one_line() {
        let message = timeout_message(&["a".into(), "b".into()], Duration::from_secs(240));
        assert!(message.starts_with("timed out after 240s: TracingPolicies still present"));
        assert!(message.contains(": a, b."));
        assert!(!message.contains('\n'));
    }
}

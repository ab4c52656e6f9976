//! What this binary was built from: the package version and the git revision, the latter set by the build
//! script (`build.rs`: `CROSSTRACE_REVISION` when the build sets it, as `just image` does, else
//! `git rev-parse --short=12 HEAD`, else `unknown`). `crosstrace --version` prints [`VERSION_LINE`]; the
//! image's `org.opencontainers.image.revision` label is [`REVISION`]; metrics may use both.

/// The package version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git revision built from: 12 hex digits of the commit, or whatever `CROSSTRACE_REVISION` said, or
/// `unknown` for a build outside a checkout.
pub const REVISION: &str = env!("CROSSTRACE_REVISION");

/// What `crosstrace --version` prints after the name, e.g. `0.1.0 (rev 1a2b3c4d5e6f)`.
pub const VERSION_LINE: &str = concat!(env!("CARGO_PKG_VERSION"), " (rev ", env!("CROSSTRACE_REVISION"), ")");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_names_version_and_revision() {
        assert_eq!(VERSION_LINE, format!("{VERSION} (rev {REVISION})"));
        assert!(!REVISION.is_empty());
        assert!(REVISION.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)), "{REVISION}");
    }
}

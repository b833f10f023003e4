//! The device profiles built into the binary from `device-profiles/`, and the default
//! config that `run` uses without a file.

use std::path::Path;

use crate::profile::{self, ProfileSet};

include!(concat!(env!("OUT_DIR"), "/builtin_profiles.rs"));

/// Parses the built-in profiles. They are checked by the test suite, so a profile that
/// fails here is a build defect; it is logged and skipped.
pub fn builtin_profiles() -> ProfileSet {
    let mut set = ProfileSet::default();
    for (name, text) in BUILTIN_PROFILES {
        let path = Path::new("device-profiles").join(name);
        match profile::parse(text, Some(&path)) {
            Ok(profile) => set.insert(profile),
            Err(errors) => {
                for error in errors {
                    tracing::error!(%error, "built-in profile is invalid");
                }
            }
        }
    }
    set
}

//! Time travel over the store: naming a moment ([`moment`]), comparing a
//! path between two moments ([`diff`]) and archiving a moment as a tar file
//! ([`export`]). Materializing a moment into a directory is replay's job
//! (`crate::replay::restore`); the batch timeline is `diffkeeper::report`'s;
//! dropping moments is `crate::retention`'s.

pub mod diff;
pub mod export;
pub mod moment;

pub use moment::Moment;

use crate::error::{bail, Result};

use crate::store::Reader;

/// Finds which root a path given as `PATH` or `ROOT:PATH` belongs to, and
/// the path's store form (no leading or trailing `/`).
pub fn locate(reader: &Reader, spec: &str) -> Result<(String, Vec<u8>)> {
    let roots = reader.roots()?;
    if let Some((root, path)) = spec.split_once(':') {
        if roots.iter().any(|r| r == root) {
            let path = clean(path);
            if path.is_empty() || reader.versions_of(root, &path)?.is_empty() {
                bail!(
                    "store {} has no history of {spec:?}",
                    reader.store_path().display()
                );
            }
            return Ok((root.to_string(), path));
        }
    }
    let path = clean(spec);
    if path.is_empty() {
        bail!("give a path inside a state directory (PATH or ROOT:PATH)");
    }
    let holders: Vec<&String> = roots
        .iter()
        .filter(|root| {
            reader
                .versions_of(root, &path)
                .is_ok_and(|versions| !versions.is_empty())
        })
        .collect();
    match holders.as_slice() {
        [root] => Ok(((*root).clone(), path)),
        [] => bail!(
            "store {} has no history of {spec:?} (its state directories: {})",
            reader.store_path().display(),
            roots.join(", ")
        ),
        several => bail!(
            "{spec:?} is in several state directories ({}); name one as ROOT:PATH",
            several
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The state directories a moment is materialized for: `only` (which the
/// store must have), or all of them; each name checked, since a hostile
/// store could name one `../x`.
pub fn select_roots(reader: &Reader, only: Option<&str>) -> Result<Vec<String>> {
    let store = reader.store_path();
    let all = reader.roots()?;
    let names = match only {
        Some(name) if all.iter().any(|r| r == name) => vec![name.to_string()],
        Some(name) => bail!(
            "store {} has no state directory named {name:?} (it has: {})",
            store.display(),
            all.join(", ")
        ),
        None => all,
    };
    for name in &names {
        crate::roots::check_name(store, name)?;
    }
    Ok(names)
}

fn clean(path: &str) -> Vec<u8> {
    path.trim_start_matches("./")
        .trim_matches('/')
        .as_bytes()
        .to_vec()
}

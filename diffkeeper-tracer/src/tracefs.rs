//! tracefs, which attaching tracepoints needs: found or mounted.

use crate::error::{unsupported, Result};

/// Where tracefs is expected.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Whether tracefs is mounted at [`TRACEFS`], per the mount table (its
/// contents may be unreadable without privileges).
fn mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(TRACEFS) && fields.next() == Some("tracefs")
        })
    })
}

/// Mounts tracefs at [`TRACEFS`] unless it is there. Returns whether it
/// mounted it.
pub fn ensure_mounted() -> Result<bool> {
    if mounted() {
        return Ok(false);
    }
    match rustix::mount::mount("tracefs", TRACEFS, "tracefs", rustix::mount::MountFlags::empty(), None) {
        Ok(()) => {
            tracing::info!("mounted tracefs at {TRACEFS}");
            Ok(true)
        }
        Err(e) => unsupported!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({e}): mount it on the host \
             (`mount -t tracefs tracefs {TRACEFS}`) or give diffkeeper CAP_SYS_ADMIN"
        ),
    }
}

//! Node state that must survive restarts and reboots, under `--state-dir`.
//!
//! Today that is the VTEP MAC: flannel picks a new random one at every start, and
//! peers then keep stale ARP/FDB entries (flannel #1828, #1795, #533). We pick it once
//! and keep it in a file.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use crate::mac::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The MAC file for a VXLAN device name (`flannel.1` → `<dir>/flannel.1.mac`).
pub fn vtep_mac_path(dir: &Path, device: &str) -> PathBuf {
    dir.join(format!("{device}.mac"))
}

/// Returns the stored VTEP MAC for `device`, creating and storing a random locally
/// administered one the first time. A corrupt file is replaced, with a warning.
pub fn load_or_create_vtep_mac(dir: &Path, device: &str) -> Result<MacAddr, StateError> {
    let path = vtep_mac_path(dir, device);
    match std::fs::read_to_string(&path) {
        Ok(s) => match s.trim().parse::<MacAddr>() {
            Ok(mac) if mac.is_valid_vtep() => return Ok(mac),
            _ => {
                tracing::warn!(path = %path.display(), "state file holds no valid MAC, picking a new one")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StateError::Read { path, source }),
    }
    let mac = MacAddr::random_local();
    std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let tmp = path.with_extension("mac.tmp");
    let write = |p: &Path| -> std::io::Result<()> {
        let mut f = std::fs::File::create(p)?;
        writeln!(f, "{mac}")?;
        f.sync_all()
    };
    write(&tmp)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })?;
    tracing::info!(device, %mac, path = %path.display(), "picked a new VTEP MAC");
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_across_loads_and_corruption_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_vtep_mac(dir.path(), "flannel.1").unwrap();
        assert!(a.is_valid_vtep());
        assert_eq!(load_or_create_vtep_mac(dir.path(), "flannel.1").unwrap(), a);
        let b = load_or_create_vtep_mac(dir.path(), "flannel.2").unwrap();
        assert_ne!(a, b);
        std::fs::write(vtep_mac_path(dir.path(), "flannel.1"), "garbage").unwrap();
        let c = load_or_create_vtep_mac(dir.path(), "flannel.1").unwrap();
        assert!(c.is_valid_vtep());
        assert_eq!(load_or_create_vtep_mac(dir.path(), "flannel.1").unwrap(), c);
    }
}

//! The eBPF dataplane's object file, embedded at build time by `build.rs`.
//!
//! A `flanneld` built without the BPF toolchain embeds an empty file instead, so the rest
//! of the agent still builds and runs; only the eBPF dataplane is refused, with advice.

use thiserror::Error;

/// Errors of the eBPF dataplane.
#[derive(Debug, Error)]
pub enum EbpfError {
    /// `build.rs` found no BPF object, so an empty stub was embedded.
    #[error(
        "the eBPF dataplane is not built into this flanneld: run cargo xtask build-ebpf, then rebuild"
    )]
    NotBuilt,
}

/// The object as embedded; aligned because aya parses ELF structures in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel-ebpf.o"));

/// The embedded BPF object, or [`EbpfError::NotBuilt`] when this build has none.
pub fn ebpf_object() -> Result<&'static [u8], EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    Ok(OBJECT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Either outcome is legitimate (the object is optional at build time), but each has
    /// to be well-formed: an aligned ELF object, or the error with the build advice.
    #[test]
    fn embedded_object_or_advice() {
        match ebpf_object() {
            Ok(bytes) => {
                assert!(bytes.starts_with(b"\x7fELF"), "embedded object is not ELF");
                assert_eq!(bytes.as_ptr().align_offset(8), 0, "object is not aligned");
            }
            Err(e) => assert_eq!(
                e.to_string(),
                "the eBPF dataplane is not built into this flanneld: run cargo xtask \
                 build-ebpf, then rebuild"
            ),
        }
    }
}

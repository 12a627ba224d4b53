//! The few libc calls the eBPF dataplane needs: bpffs detection and mount, interface
//! names. Each runs in the calling thread's mount and network namespace.

use std::{
    ffi::{CStr, CString},
    io,
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// True when `path` (which must exist) lies on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable `statfs` that outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // `f_type`'s integer type differs between libc targets.
    Ok(st.f_type == BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem at `path` (root-only, mode 0700).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    let source = c"bpf";
    let data = c"mode=0700";
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; mount(2)
    // does not keep them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name of interface `ifindex` in the calling thread's network namespace.
pub fn ifname(ifindex: u32) -> io::Result<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname(3) may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    let name = CStr::from_bytes_until_nul(&buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "interface name not terminated"))?;
    Ok(name.to_string_lossy().into_owned())
}

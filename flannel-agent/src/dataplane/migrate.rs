//! Carrying pinned maps over a change of the map layout (`LAYOUT_VERSION`), for both
//! fast paths.
//!
//! Design note. A flanneld whose layout differs from the pinned one finds the old maps
//! in `v<N>` beside its own `v<LAYOUT_VERSION>` and the old programs still attached to the
//! pinned links, forwarding with them. Before its own programs replace those on the links,
//! [`migrate`] copies into the new maps whatever it can read without knowing the old
//! layout: every map whose name, kernel map type and key and value sizes are the same in
//! both layouts is copied entry by entry (hash and LPM trie: every key; array and per-CPU
//! array: the indices both have, per CPU), so peers keep their slots and counters. A map
//! whose shape changed is not copied: a warning names it and both shapes, and it starts
//! empty (the agent's sync writes the peers again; counters restart at zero). Nothing is
//! converted field by field, which is why a map whose meaning changes while its shape does
//! not must get a new name (see `flannel_common::LAYOUT_VERSION`).
//!
//! Only the newest other layout is read, so entries of two old layouts are never mixed.
//! Its pins are removed by the caller once the new programs run. If the agent dies in
//! between, the next start copies again: the peers are the same, the counters lose what
//! the new programs counted in between.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray},
};
use flannel_common::{
    Counters, LAYOUT_VERSION, MAP_CONFIG, MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES,
    MAP_STATS, MAP_UDP_CONFIG,
    maps::{Config, Peer, PeerCounters, PeerSource, SourceKey, UdpConfig},
};
use tracing::{info, warn};

use super::ebpf::{EbpfError, map_mut};

/// What [`migrate`] carried over from an older layout.
#[derive(Debug)]
pub(super) struct Migration {
    /// The layout version the entries came from.
    pub(super) version: u32,
    /// The maps whose entries were copied.
    pub(super) copied: Vec<&'static str>,
}

impl Migration {
    /// Whether the peers a previous agent synced are still whole in the new maps: always
    /// when nothing was migrated; after a migration, only when both the peer map and the
    /// source map were copied. Until then, decap must not drop unknown sources.
    pub(super) fn peers_intact(migration: Option<&Migration>) -> bool {
        migration.is_none_or(|m| m.copied.contains(&MAP_PEERS) && m.copied.contains(&MAP_SOURCES))
    }
}

/// A map as the kernel describes it: what must match for its entries to be copied
/// (type, key and value sizes), and its size.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    map_type: Option<MapType>,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl Shape {
    fn of(info: &MapInfo) -> Shape {
        Shape {
            map_type: info.map_type().ok(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        }
    }

    /// True when entries of a map shaped `self` can be written as they are into a map
    /// shaped `new` (the number of entries may differ).
    fn copies_into(&self, new: &Shape) -> bool {
        self.map_type.is_some()
            && self.map_type == new.map_type
            && self.key_size == new.key_size
            && self.value_size == new.value_size
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.map_type {
            Some(t) => write!(f, "{t:?}")?,
            None => f.write_str("unknown type")?,
        }
        write!(
            f,
            " (key {} B, value {} B, {} entries)",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// How the entries of one map are copied: through the aya map type and the Rust key and
/// value types the agent uses for it. Returns how many entries were copied.
type CopyFn = fn(&Map, &mut Map) -> Result<u32, MapError>;

/// A map's [`CopyFn`] with the key and value sizes of its types.
#[derive(Clone, Copy)]
struct Copier {
    key_size: u32,
    value_size: u32,
    copy: CopyFn,
}

/// The size of a map key or value type (a few bytes, so the cast cannot truncate).
const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

impl Copier {
    fn array<V: Pod>() -> Copier {
        Copier {
            key_size: size::<u32>(),
            value_size: size::<V>(),
            copy: copy_array::<V>,
        }
    }

    fn per_cpu_array<V: Pod>() -> Copier {
        Copier {
            key_size: size::<u32>(),
            value_size: size::<V>(),
            copy: copy_per_cpu_array::<V>,
        }
    }

    fn hash<K: Pod, V: Pod>() -> Copier {
        Copier {
            key_size: size::<K>(),
            value_size: size::<V>(),
            copy: copy_hash::<K, V>,
        }
    }

    fn lpm_trie<K: Pod, V: Pod>() -> Copier {
        Copier {
            key_size: size::<aya::maps::lpm_trie::Key<K>>(),
            value_size: size::<V>(),
            copy: copy_lpm_trie::<K, V>,
        }
    }
}

/// The copier of every map in `flannel_common::MAPS` (a unit test checks that none is
/// missing and that their sizes are those of `MAPS`).
fn copier(name: &str) -> Option<Copier> {
    Some(match name {
        MAP_STATS => Copier::per_cpu_array::<Counters>(),
        MAP_CONFIG => Copier::array::<Config>(),
        MAP_UDP_CONFIG => Copier::array::<UdpConfig>(),
        MAP_PEERS => Copier::lpm_trie::<u32, Peer>(),
        MAP_SOURCES => Copier::hash::<SourceKey, PeerSource>(),
        MAP_PEER_COUNTERS => Copier::per_cpu_array::<PeerCounters>(),
        MAP_REASONS => Copier::per_cpu_array::<u64>(),
        _ => return None,
    })
}

fn copy_array<V: Pod>(old: &Map, new: &mut Map) -> Result<u32, MapError> {
    let old: Array<_, V> = Array::try_from(old)?;
    let mut new: Array<_, V> = Array::try_from(new)?;
    let n = old.len().min(new.len());
    for i in 0..n {
        new.set(i, old.get(&i, 0)?, 0)?;
    }
    Ok(n)
}

fn copy_per_cpu_array<V: Pod>(old: &Map, new: &mut Map) -> Result<u32, MapError> {
    let old: PerCpuArray<_, V> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<_, V> = PerCpuArray::try_from(new)?;
    let n = old.len().min(new.len());
    for i in 0..n {
        new.set(i, old.get(&i, 0)?, 0)?;
    }
    Ok(n)
}

fn copy_hash<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<u32, MapError> {
    let old: HashMap<_, K, V> = HashMap::try_from(old)?;
    let mut new: HashMap<_, K, V> = HashMap::try_from(new)?;
    let mut n = 0;
    for item in old.iter() {
        let (key, value) = item?;
        new.insert(key, value, 0)?;
        n += 1;
    }
    Ok(n)
}

fn copy_lpm_trie<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<u32, MapError> {
    let old: LpmTrie<_, K, V> = LpmTrie::try_from(old)?;
    let mut new: LpmTrie<_, K, V> = LpmTrie::try_from(new)?;
    let mut n = 0;
    for item in old.iter() {
        let (key, value) = item?;
        new.insert(&key, value, 0)?;
        n += 1;
    }
    Ok(n)
}

/// Copies into the maps of `ebpf` named in `pinned` (this build's layout, pinned in
/// `layout_dir`) the entries of the same-named maps of the newest layout in `old`
/// (`(version, directory)`, as `other_layouts` lists them), where type and key and value
/// sizes match. Maps that do not match, or cannot be opened, are left as they are and
/// named in a warning. `None` when `old` is empty. Call before the new programs are
/// attached: the old ones keep the old maps current until then.
pub(super) fn migrate(
    ebpf: &mut Ebpf,
    layout_dir: &Path,
    pinned: &[&'static str],
    old: &[(u32, PathBuf)],
) -> Result<Option<Migration>, EbpfError> {
    let Some((version, old_dir)) = old.iter().max_by_key(|(v, _)| *v) else {
        return Ok(None);
    };
    let version = *version;
    for (other, dir) in old.iter().filter(|(v, _)| *v != version) {
        warn!(
            version = other,
            dir = %dir.display(),
            "several old layouts are pinned; only the newest is migrated, this one is dropped"
        );
    }
    let mut copied = Vec::new();
    for &name in pinned {
        let old_path = old_dir.join(name);
        if !old_path.exists() {
            info!(
                map = name,
                from = version,
                "map not in the old layout; it starts empty"
            );
            continue;
        }
        let old_shape = match MapInfo::from_pin(&old_path) {
            Ok(info) => Shape::of(&info),
            Err(e) => {
                warn!(
                    map = name,
                    path = %old_path.display(),
                    error = %e,
                    "cannot open the old layout's map; it is not migrated"
                );
                continue;
            }
        };
        let new_path = layout_dir.join(name);
        let new_shape = MapInfo::from_pin(&new_path)
            .map(|info| Shape::of(&info))
            .map_err(|e| EbpfError::Migrate {
                op: "inspect",
                name,
                path: new_path,
                source: Box::new(e),
            })?;
        if !old_shape.copies_into(&new_shape) {
            warn!(
                map = name,
                from = version,
                to = LAYOUT_VERSION,
                old = %old_shape,
                new = %new_shape,
                "map layout changed; its entries are not migrated and it starts empty"
            );
            continue;
        }
        let Some(copier) = copier(name)
            .filter(|c| (c.key_size, c.value_size) == (new_shape.key_size, new_shape.value_size))
        else {
            warn!(
                map = name,
                new = %new_shape,
                "no copy of a map of this name and shape is known; it is not migrated"
            );
            continue;
        };
        let migrate_err = |op| {
            let path = old_path.clone();
            move |e| EbpfError::Migrate {
                op,
                name,
                path,
                source: Box::new(e),
            }
        };
        let old_map = MapData::from_pin(&old_path)
            .and_then(Map::from_map_data)
            .map_err(migrate_err("open"))?;
        let new_map = map_mut(ebpf, name)?;
        let entries = (copier.copy)(&old_map, new_map).map_err(migrate_err("copy entries of"))?;
        info!(
            map = name,
            from = version,
            to = LAYOUT_VERSION,
            entries,
            "migrated map"
        );
        copied.push(name);
    }
    Ok(Some(Migration { version, copied }))
}

#[cfg(test)]
mod tests {
    use flannel_common::MAPS;

    use super::*;

    /// Every map of the object can be migrated, with the sizes the object has: a map
    /// added to `MAPS` without a copier fails here, not silently at the next upgrade.
    #[test]
    fn every_map_has_a_copier_of_its_size() {
        for &(name, key, value) in MAPS {
            let c = copier(name).unwrap_or_else(|| panic!("no copier for {name}"));
            assert_eq!((c.key_size, c.value_size), (key, value), "{name}");
        }
        assert!(copier("FLANNEL_NO_SUCH_MAP").is_none());
    }

    #[test]
    fn shapes_match_on_type_and_sizes_only() {
        let new = Shape {
            map_type: Some(MapType::PerCpuArray),
            key_size: 4,
            value_size: 8,
            max_entries: 18,
        };
        let fewer = Shape {
            max_entries: 17,
            ..new
        };
        assert!(fewer.copies_into(&new));
        let wider = Shape {
            value_size: 16,
            ..new
        };
        assert!(!wider.copies_into(&new));
        let other_key = Shape { key_size: 8, ..new };
        assert!(!other_key.copies_into(&new));
        let array = Shape {
            map_type: Some(MapType::Array),
            ..new
        };
        assert!(!array.copies_into(&new));
        let unknown = Shape {
            map_type: None,
            ..new
        };
        assert!(!unknown.copies_into(&Shape {
            map_type: None,
            ..new
        }));
        assert_eq!(
            wider.to_string(),
            "PerCpuArray (key 4 B, value 16 B, 18 entries)"
        );
    }

    #[test]
    fn peers_intact_needs_both_peer_maps() {
        assert!(Migration::peers_intact(None));
        let m = |copied: Vec<&'static str>| Migration { version: 1, copied };
        assert!(Migration::peers_intact(Some(&m(vec![
            MAP_PEERS,
            MAP_SOURCES,
            MAP_CONFIG
        ]))));
        assert!(!Migration::peers_intact(Some(&m(vec![
            MAP_PEERS, MAP_CONFIG
        ]))));
        assert!(!Migration::peers_intact(Some(&m(vec![
            MAP_SOURCES,
            MAP_PEER_COUNTERS
        ]))));
        assert!(!Migration::peers_intact(Some(&m(vec![]))));
    }
}

//! Carrying pinned maps over a change of the map layout (`LAYOUT_VERSION`), for every
//! fast path.
//!
//! Design note. A flanneld whose layout differs from the pinned one finds the old maps
//! in `v<N>` beside its own `v<LAYOUT_VERSION>` and the old programs still attached to the
//! pinned links, forwarding with them. [`migrate`] carries over whatever it can without
//! knowing the old layout: every map whose name, kernel map type and key and value sizes
//! are the same in both layouts, entry by entry (hash and LPM trie: every key; arrays:
//! the indices both have; per-CPU arrays: per CPU), so peers keep their slots and
//! counters. A map whose shape changed is not carried over: a warning names it and both
//! shapes, and it starts empty (the agent's sync writes the peers again; counters restart
//! at zero). Nothing is converted field by field, which is why a map whose meaning
//! changes while its shape does not must get a new name (see
//! `flannel_common::LAYOUT_VERSION`).
//!
//! Two phases, around the moment the new programs replace the old ones on the links:
//! - before the swap, the state (peers, sources, config) is copied, so the new programs
//!   find every peer from their first packet: no window where encap misses a peer or
//!   decap drops one;
//! - after the swap, the counters (per-CPU arrays) of the old layout are added to what
//!   the new programs have counted since ([`Migration::finish`]): the old programs count
//!   until the swap, so a copy made before it would lose what they count in between.
//!   Each old counter map is unpinned as soon as it is added, so a restart cannot add it
//!   twice. (Each entry is a read, an add and a write; a packet counted by the new
//!   programs during those microseconds is lost.)
//!
//! Only the newest other layout is read, so entries of two old layouts are never mixed.
//! The caller removes its remaining pins once the new programs run. If the agent dies in
//! between, the next start migrates again from what is left: the state is copied again
//! (it has not changed: no sync happened), counters not yet added are added then.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray,
        PerCpuValues,
    },
};
use flannel_common::{
    Counters, LAYOUT_VERSION, MAP_CONFIG, MAP_HOSTGW_CONFIG, MAP_PEER_COUNTERS, MAP_PEERS,
    MAP_REASONS, MAP_SOURCES, MAP_STATS, MAP_UDP_CONFIG,
    maps::{Config, HostGwConfig, Peer, PeerCounters, PeerSource, SourceKey, UdpConfig},
};
use tracing::{info, warn};

use super::{ebpf::EbpfError, pinned::map_mut};

/// What [`migrate`] carried over from an older layout.
#[derive(Debug)]
pub(super) struct Migration {
    /// The layout version the entries came from.
    pub(super) version: u32,
    /// The maps whose entries were copied or are to be added ([`Migration::finish`]).
    pub(super) copied: Vec<&'static str>,
    /// The old layout's counter maps, added to the new ones after the swap.
    counters: Vec<(&'static str, PathBuf, CopyFn)>,
}

impl Migration {
    /// Whether the peers a previous agent synced are still whole in the new maps: always
    /// when nothing was migrated; after a migration, only when both the peer map and the
    /// source map were copied. Until then, decap must not drop unknown sources.
    pub(super) fn peers_intact(migration: Option<&Migration>) -> bool {
        migration.is_none_or(|m| m.copied.contains(&MAP_PEERS) && m.copied.contains(&MAP_SOURCES))
    }

    /// Adds the old layout's counters to the new maps of `ebpf` and unpins each old map
    /// once it is added. Call right after the new programs replaced the old ones. The
    /// programs already run with the new maps, so a failure here only costs counts: it is
    /// logged, not returned.
    pub(super) fn finish(self, ebpf: &mut Ebpf) {
        for (name, path, add) in self.counters {
            let added = MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .and_then(|old| match ebpf.map_mut(name) {
                    Some(new) => add(&old, new),
                    None => Err(MapError::InvalidName { name: name.into() }),
                });
            match added {
                Ok(entries) => info!(
                    map = name,
                    from = self.version,
                    to = LAYOUT_VERSION,
                    entries,
                    "migrated map (counts added after the swap)"
                ),
                Err(e) => {
                    warn!(
                        map = name,
                        path = %path.display(),
                        error = %e,
                        "cannot add (all of) the old layout's counts; those are lost"
                    );
                    continue;
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(map = name, path = %path.display(), error = %e, "cannot unpin an added counter map");
            }
        }
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

/// How the entries of one old map get into the new one: through the aya map type and
/// the Rust key and value types the agent uses for it. Returns how many entries it wrote.
type CopyFn = fn(&Map, &mut Map) -> Result<u32, MapError>;

/// When a map is carried over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// State the new programs need from their first packet: copied before the swap.
    BeforeSwap,
    /// Counters: the old layout's counts added after the swap.
    AfterSwap,
}

/// A map's [`CopyFn`] with the key and value sizes of its types.
#[derive(Clone, Copy)]
struct Copier {
    key_size: u32,
    value_size: u32,
    copy: CopyFn,
    phase: Phase,
}

/// A counter value of a per-CPU array: what the old and the new programs counted add up.
trait Counter: Pod + Default + PartialEq {
    /// The sum, wrapping like the programs' increments.
    fn plus(self, other: Self) -> Self;
}

impl Counter for u64 {
    fn plus(self, other: u64) -> u64 {
        self.wrapping_add(other)
    }
}

impl Counter for Counters {
    fn plus(self, other: Counters) -> Counters {
        self.add(other)
    }
}

impl Counter for PeerCounters {
    fn plus(self, other: PeerCounters) -> PeerCounters {
        self.add(other)
    }
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
            phase: Phase::BeforeSwap,
        }
    }

    /// A per-CPU array of counters.
    fn counters<V: Counter>() -> Copier {
        Copier {
            key_size: size::<u32>(),
            value_size: size::<V>(),
            copy: add_counters::<V>,
            phase: Phase::AfterSwap,
        }
    }

    fn hash<K: Pod, V: Pod>() -> Copier {
        Copier {
            key_size: size::<K>(),
            value_size: size::<V>(),
            copy: copy_hash::<K, V>,
            phase: Phase::BeforeSwap,
        }
    }

    fn lpm_trie<K: Pod, V: Pod>() -> Copier {
        Copier {
            key_size: size::<aya::maps::lpm_trie::Key<K>>(),
            value_size: size::<V>(),
            copy: copy_lpm_trie::<K, V>,
            phase: Phase::BeforeSwap,
        }
    }
}

/// The copier of every map in `flannel_common::MAPS` (a unit test checks that none is
/// missing and that their sizes are those of `MAPS`).
fn copier(name: &str) -> Option<Copier> {
    Some(match name {
        MAP_STATS => Copier::counters::<Counters>(),
        MAP_CONFIG => Copier::array::<Config>(),
        MAP_UDP_CONFIG => Copier::array::<UdpConfig>(),
        MAP_HOSTGW_CONFIG => Copier::array::<HostGwConfig>(),
        MAP_PEERS => Copier::lpm_trie::<u32, Peer>(),
        MAP_SOURCES => Copier::hash::<SourceKey, PeerSource>(),
        MAP_PEER_COUNTERS => Copier::counters::<PeerCounters>(),
        MAP_REASONS => Copier::counters::<u64>(),
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

/// Adds, CPU by CPU, the old counts to the new ones, for the indices both arrays have.
/// Entries the old programs never counted into are skipped (most peer slots): fewer
/// writes under the running programs.
fn add_counters<V: Counter>(old: &Map, new: &mut Map) -> Result<u32, MapError> {
    let old: PerCpuArray<_, V> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<_, V> = PerCpuArray::try_from(new)?;
    let mut n = 0;
    for i in 0..old.len().min(new.len()) {
        let counted = old.get(&i, 0)?;
        if counted.iter().all(|c| *c == V::default()) {
            continue;
        }
        let now = new.get(&i, 0)?;
        let sum: Vec<V> = counted
            .iter()
            .zip(now.iter())
            .map(|(o, c)| o.plus(*c))
            .collect();
        new.set(
            i,
            PerCpuValues::try_from(sum).map_err(MapError::IoError)?,
            0,
        )?;
        n += 1;
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
/// sizes match; counter maps among them are only noted, for [`Migration::finish`]. Maps
/// that do not match, or cannot be opened, are left as they are and named in a warning.
/// `None` when `old` is empty. Call before the new programs are attached.
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
    let mut counters = Vec::new();
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
        copied.push(name);
        if copier.phase == Phase::AfterSwap {
            counters.push((name, old_path, copier.copy));
            continue;
        }
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
    }
    Ok(Some(Migration {
        version,
        copied,
        counters,
    }))
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

    /// State goes before the swap, so the new programs find every peer; counters after
    /// it, so nothing the old programs count until the swap is lost.
    #[test]
    fn state_before_the_swap_counters_after() {
        for name in [MAP_CONFIG, MAP_UDP_CONFIG, MAP_PEERS, MAP_SOURCES] {
            assert_eq!(copier(name).unwrap().phase, Phase::BeforeSwap, "{name}");
        }
        for name in [MAP_STATS, MAP_PEER_COUNTERS, MAP_REASONS] {
            assert_eq!(copier(name).unwrap().phase, Phase::AfterSwap, "{name}");
        }
    }

    #[test]
    fn counters_add_up_wrapping() {
        assert_eq!(u64::MAX.plus(3), 2);
        let a = PeerCounters {
            tx_packets: 1,
            tx_bytes: 2,
            rx_packets: 3,
            rx_bytes: u64::MAX,
        };
        assert_eq!(
            a.plus(a),
            PeerCounters {
                tx_packets: 2,
                tx_bytes: 4,
                rx_packets: 6,
                rx_bytes: u64::MAX - 1,
            }
        );
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
        let m = |copied: Vec<&'static str>| Migration {
            version: 1,
            copied,
            counters: Vec::new(),
        };
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

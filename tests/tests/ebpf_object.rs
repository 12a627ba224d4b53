//! The BPF object embedded in `flanneld` against the ABI in `flannel-common`.
//!
//! aya's `#[map(name = ...)]` only takes literals, so nothing but this test ties the map
//! names and key/value sizes in `flannel-ebpf` to the types the agent reads them with.
//! The object is the one `flanneld` embeds (`flannel_agent::dataplane::ebpf_object`), so
//! this also checks the build.rs embedding. Without a built object the tests skip (and
//! fail under CI=true): `cargo xtask test` builds it first.

use aya::{Ebpf, TestRun, TestRunOptions, maps::PerCpuArray, programs::SchedClassifier};
use aya_obj::{
    Object, ProgramSection,
    generated::bpf_map_type::{
        BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_PERCPU_ARRAY,
    },
};
use flannel_common::{
    Counters, MAP_CONFIG, MAP_PEER_COUNTERS, MAP_PEERS, MAP_REASONS, MAP_SOURCES, MAP_STATS,
    MAP_UDP_CONFIG, MAPS, PINNED_MAPS, PROG_DECAP, PROG_ENCAP, PROG_STATS, PROG_UDP_DECAP,
    PROG_UDP_ENCAP, PROGRAMS, UDP_PINNED_MAPS,
    maps::{MAX_PEERS, STATS_ENTRIES, STATS_INDEX_ALL, StatsKey, UdpConfig, reason},
};
use flannel_tests::{require_root, skip};

/// The embedded object, or `None` after a skip (or a panic under CI).
fn object(test_name: &str) -> Option<&'static [u8]> {
    match flannel_agent::dataplane::ebpf_object() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            skip(test_name, &e.to_string());
            None
        }
    }
}

#[test]
fn maps_match_flannel_common() {
    let Some(bytes) = object("maps_match_flannel_common") else {
        return;
    };
    let obj = Object::parse(bytes).expect("parse the embedded BPF object");

    for &(name, key_size, value_size) in MAPS {
        let map = obj
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("map {name} missing; object has {:?}", obj.maps.keys()));
        assert_eq!(map.key_size(), key_size, "{name} key size");
        assert_eq!(map.value_size(), value_size, "{name} value size");
    }
    // Only the maps flannel-common knows of: an unlisted map has no checked ABI.
    let mut names: Vec<&str> = obj.maps.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = MAPS.iter().map(|m| m.0).collect();
    expected.sort_unstable();
    assert_eq!(names, expected);

    // Map types and sizes the agent relies on (an LPM trie needs BPF_F_NO_PREALLOC).
    for (name, map_type, max_entries) in [
        (MAP_STATS, BPF_MAP_TYPE_PERCPU_ARRAY, STATS_ENTRIES),
        (MAP_CONFIG, BPF_MAP_TYPE_ARRAY, 1),
        (MAP_PEERS, BPF_MAP_TYPE_LPM_TRIE, MAX_PEERS),
        (MAP_SOURCES, BPF_MAP_TYPE_HASH, MAX_PEERS),
        (MAP_PEER_COUNTERS, BPF_MAP_TYPE_PERCPU_ARRAY, MAX_PEERS),
        (MAP_REASONS, BPF_MAP_TYPE_PERCPU_ARRAY, reason::COUNT),
        (MAP_UDP_CONFIG, BPF_MAP_TYPE_ARRAY, 1),
    ] {
        let map = &obj.maps[name];
        assert_eq!(map.map_type(), map_type as u32, "{name} type");
        assert_eq!(map.max_entries(), max_entries, "{name} max entries");
        // Pins are chosen by the agent (a versioned directory), never by the object.
        assert_eq!(
            map.pinning(),
            aya_obj::maps::PinningType::None,
            "{name} pinning"
        );
    }
    for name in PINNED_MAPS.iter().chain(UDP_PINNED_MAPS) {
        assert!(
            MAPS.iter().any(|m| m.0 == *name),
            "pinned map {name} not in MAPS"
        );
    }
    // The udp fast path pins its own configuration, never the vxlan one, and the vxlan
    // path never pins the udp configuration: one pin directory serves either.
    assert!(UDP_PINNED_MAPS.contains(&MAP_UDP_CONFIG) && !UDP_PINNED_MAPS.contains(&MAP_CONFIG));
    assert!(PINNED_MAPS.contains(&MAP_CONFIG) && !PINNED_MAPS.contains(&MAP_UDP_CONFIG));
    assert_eq!(
        obj.maps[MAP_UDP_CONFIG].value_size() as usize,
        size_of::<UdpConfig>()
    );

    let stats = &obj.maps[MAP_STATS];
    assert_eq!(stats.map_type(), BPF_MAP_TYPE_PERCPU_ARRAY as u32);
    assert_eq!(stats.max_entries(), STATS_ENTRIES);
    assert_eq!(stats.key_size() as usize, size_of::<StatsKey>());
    assert_eq!(stats.value_size() as usize, size_of::<Counters>());
}

#[test]
fn programs_match_flannel_common() {
    let Some(bytes) = object("programs_match_flannel_common") else {
        return;
    };
    let obj = Object::parse(bytes).expect("parse the embedded BPF object");
    for name in PROGRAMS {
        let prog = obj.programs.get(*name).unwrap_or_else(|| {
            panic!(
                "program {name} missing; object has {:?}",
                obj.programs.keys()
            )
        });
        // All of them are TC classifiers.
        assert!(
            matches!(prog.section, ProgramSection::SchedClassifier),
            "{name} is not a TC classifier: {:?}",
            prog.section
        );
    }
    // Both fast paths: encap and decap each.
    for name in [PROG_ENCAP, PROG_DECAP, PROG_UDP_ENCAP, PROG_UDP_DECAP] {
        assert!(PROGRAMS.contains(&name), "{name} not in PROGRAMS");
    }
}

/// The verifier of the running kernel accepts every program of the object (the vxlan and
/// the udp fast path alike).
#[test]
fn verifier_accepts_every_program() {
    const TEST: &str = "verifier_accepts_every_program";
    if !require_root(TEST) {
        return;
    }
    let Some(bytes) = object(TEST) else {
        return;
    };
    let mut ebpf = Ebpf::load(bytes).expect("load the BPF object into the kernel");
    for name in PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("program present")
            .try_into()
            .expect("program is a classifier");
        prog.load()
            .unwrap_or_else(|e| panic!("verifier rejects {name}: {e:?}"));
    }
    flannel_agent::dataplane::UdpFastPath::probe().expect("udp fast path probe");
}

/// Loads `flannel_stats` into the kernel and runs it through BPF_PROG_TEST_RUN: the
/// verifier accepts it, it returns TC_ACT_OK and it counts exactly what it was given.
#[test]
fn stats_program_counts_test_runs() {
    const TEST: &str = "stats_program_counts_test_runs";
    if !require_root(TEST) {
        return;
    }
    let Some(bytes) = object(TEST) else {
        return;
    };
    let mut ebpf = Ebpf::load(bytes).expect("load the BPF object into the kernel");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_STATS)
        .expect("program present")
        .try_into()
        .expect("program is a classifier");
    prog.load().expect("verifier accepts flannel_stats");

    // An Ethernet frame's worth of zeroes; the program reads only the skb length.
    const LEN: usize = 64;
    const RUNS: u32 = 5;
    let frame = [0u8; LEN];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat: RUNS,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, 0, "TC_ACT_OK");

    let stats: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(ebpf.map(MAP_STATS).expect("map present")).expect("per-CPU array");
    let total = stats
        .get(&STATS_INDEX_ALL, 0)
        .expect("read counters")
        .iter()
        .fold(Counters::default(), |acc, c| acc.add(*c));
    assert_eq!(
        total,
        Counters {
            packets: u64::from(RUNS),
            bytes: u64::from(RUNS) * LEN as u64,
        }
    );
}

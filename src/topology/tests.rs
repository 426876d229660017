use super::fake::FakeMachine;
use super::*;

#[test]
fn two_socket_machine_with_four_gpus() {
    let m = FakeMachine::two_socket_four_gpus();
    let inv = collect(&m.roots()).unwrap();
    assert_eq!(inv.hostname, "fakenode");
    assert_eq!(inv.cpu_count(), 8);
    assert_eq!(inv.core_count(), 4);
    assert_eq!(inv.memory_total_bytes, 64 << 30);
    assert_eq!(inv.numa_nodes.len(), 2);
    assert_eq!(inv.numa_nodes[1].cpus.to_string(), "2-3,6-7");
    assert_eq!(inv.numa_nodes[1].memory_total_bytes, 32 << 30);
    let cpu6 = inv.cpus.iter().find(|c| c.id == 6).unwrap();
    assert_eq!((cpu6.package_id, cpu6.core_id, cpu6.numa_node), (1, 0, 1));
    assert_eq!(cpu6.thread_siblings.to_string(), "2,6");

    // The NIC is not a GPU.
    let addrs: Vec<String> = inv.gpus.iter().map(|g| g.address.to_string()).collect();
    assert_eq!(
        addrs,
        [
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:ca:00.0",
            "0000:cb:00.0"
        ]
    );
    for g in &inv.gpus {
        assert_eq!(g.name.as_deref(), Some("GH100 [H100 SXM5 80GB]"));
        assert_eq!(g.vendor_name.as_deref(), Some("NVIDIA Corporation"));
        assert_eq!(g.companions.len(), 1, "{}", g.address);
        assert_eq!(g.companions[0].class, 0x040300);
        assert!(g.companions[0].address.same_slot(&g.address));
        assert_eq!(g.uuid, None);
    }
    let g17 = &inv.gpus[0];
    assert_eq!(g17.numa_node, Some(0));
    assert_eq!(g17.iommu_group, Some(20));
    let members: Vec<String> = g17
        .iommu_group_members
        .iter()
        .map(|f| f.address.to_string())
        .collect();
    assert_eq!(members, ["0000:17:00.1", "0000:18:00.0", "0000:18:00.1"]);
    let gca = &inv.gpus[2];
    assert_eq!(gca.numa_node, Some(1));
    assert_eq!(gca.driver.as_deref(), Some("nvidia"));
    assert_eq!(gca.iommu_group_members.len(), 1);
    assert_eq!(inv.gpus[3].driver.as_deref(), Some("vfio-pci"));
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
}

#[test]
fn machine_without_numa_directory_is_one_node() {
    let m = FakeMachine::new();
    m.meminfo(8 * 1024 * 1024);
    m.online("0-3");
    for c in 0..4 {
        m.cpu(c, 0, c, &c.to_string());
    }
    let inv = collect(&m.roots()).unwrap();
    assert_eq!(inv.numa_nodes.len(), 1);
    assert_eq!(inv.numa_nodes[0].cpus.to_string(), "0-3");
    assert_eq!(inv.numa_nodes[0].memory_total_bytes, 8 << 30);
    assert!(inv.cpus.iter().all(|c| c.numa_node == 0));
    assert!(inv.gpus.is_empty());
}

#[test]
fn empty_online_cpulist_is_a_clear_error() {
    let m = FakeMachine::new();
    m.meminfo(1024);
    m.online("");
    let e = collect(&m.roots()).unwrap_err().to_string();
    assert!(
        e.contains("devices/system/cpu/online") && e.contains("no online CPUs"),
        "{e}"
    );
}

#[test]
fn garbage_cpulist_names_the_file() {
    let m = FakeMachine::two_socket_four_gpus();
    m.numa_node(1, "2-", 1024);
    let e = collect(&m.roots()).unwrap_err().to_string();
    assert!(e.contains("node1/cpulist") && e.contains("\"2-\""), "{e}");
}

#[test]
fn memory_only_numa_node_has_empty_cpulist() {
    let m = FakeMachine::two_socket_four_gpus();
    m.numa_node(2, "", 16 * 1024 * 1024);
    let inv = collect(&m.roots()).unwrap();
    assert_eq!(inv.numa_nodes.len(), 3);
    assert!(inv.numa_nodes[2].cpus.is_empty());
    assert_eq!(inv.numa_nodes[2].memory_total_bytes, 16 << 30);
}

#[test]
fn garbage_device_numa_node_falls_back_to_unknown_with_a_warning() {
    let m = FakeMachine::two_socket_four_gpus();
    m.write("sys/bus/pci/devices/0000:18:00.0/numa_node", "banana\n");
    let inv = collect(&m.roots()).unwrap();
    assert_eq!(inv.gpus[1].numa_node, None);
    assert_eq!(inv.warnings.len(), 1);
    assert!(
        inv.warnings[0].contains("0000:18:00.0/numa_node"),
        "{:?}",
        inv.warnings
    );
}

#[test]
fn garbage_core_id_is_an_error_not_a_panic() {
    let m = FakeMachine::two_socket_four_gpus();
    m.write("sys/devices/system/cpu/cpu3/topology/core_id", "-7\n");
    let e = collect(&m.roots()).unwrap_err().to_string();
    assert!(e.contains("cpu3/topology/core_id"), "{e}");
}

#[test]
fn missing_meminfo_is_an_error_naming_it() {
    let m = FakeMachine::new();
    m.online("0");
    let e = collect(&m.roots()).unwrap_err().to_string();
    assert!(e.contains("meminfo"), "{e}");
}

#[test]
fn the_real_machine_matches_nproc() {
    // Reads this machine's own /sys and /proc, read-only.
    let inv = collect(&KernelRoots::default()).unwrap();
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert!(inv.cpu_count() >= online, "{} < {online}", inv.cpu_count());
    assert!(inv.memory_total_bytes > 0);
    assert!(!inv.numa_nodes.is_empty());
}

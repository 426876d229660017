//! rivernode as a cluster of three nodes (`common::three`): the host and
//! each node in its own network namespace on one underlay bridge, each node
//! with its own runner and containerd. Placement across nodes, a target
//! honoured, a full cluster queueing, a node cut off and healed without a
//! duplicate, SSH through the host to a VPS on every node, environments
//! fetched without a shared directory, and one user's VPS meeting across
//! nodes over the overlay where another user's cannot.

mod common;

use std::collections::BTreeSet;

use common::cluster::{created_id, parts_present, private_namespaces};
use common::three::{ThreeNodes, NODES};
use common::*;

/// `task submit` of a sleeper with `extra` flags; its id.
fn sleeper(c: &ThreeNodes, extra: &[&str]) -> String {
    let mut args = vec![
        "-o",
        "json",
        "task",
        "submit",
        "--container",
        "busybox",
        "-c",
        "1",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sleep", "600"]);
    let o = c.rn(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    created_id(&o)
}

fn node_of(c: &ThreeNodes, id: &str) -> Option<String> {
    c.task(id)["placement"]["node"].as_str().map(str::to_string)
}

#[test]
fn tasks_spread_over_three_nodes_a_target_is_honoured_and_a_full_cluster_queues() {
    private_namespaces(|| {
        let Some(c) = ThreeNodes::start() else {
            return;
        };
        // A target is where the task runs.
        let on_n2 = sleeper(&c, &["-t", "n2"]);
        c.wait_state(&on_n2, "running");
        assert_eq!(node_of(&c, &on_n2).as_deref(), Some("n2"));

        // Automatic placement fills the cluster, on every node, until a
        // request finds no room anywhere and waits.
        let mut placed = BTreeSet::new();
        placed.insert("n2".to_string());
        // One core each: the cluster is full after as many as its nodes have.
        let cores: usize = nodes(&c.host_data())
            .iter()
            .map(|n| n["inventory"]["cpus"].as_array().map_or(0, Vec::len))
            .sum();
        let mut submitted = 0;
        let waiting = loop {
            submitted += 1;
            assert!(
                submitted <= cores + 1,
                "the cluster never filled up:\n{}",
                c.logs()
            );
            let id = sleeper(&c, &[]);
            let node = wait_for("a placement or a wait", || {
                let t = c.task(&id);
                if let Some(n) = t["placement"]["node"].as_str() {
                    return Some(Some(n.to_string()));
                }
                let reason = t["reason"].as_str().unwrap_or_default();
                reason.starts_with("waiting for resources").then_some(None)
            });
            match node {
                Some(n) => {
                    c.wait_state(&id, "running");
                    placed.insert(n);
                }
                None => break id,
            }
        };
        assert_eq!(
            placed,
            NODES
                .iter()
                .map(|(n, _)| n.to_string())
                .collect::<BTreeSet<_>>(),
            "work ran on every node before any waited"
        );
        let why = c.task(&waiting)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for (n, _) in NODES {
            assert!(why.contains(n), "the wait names each node: {why}");
        }
        // Room on n2 again: the waiting request runs there.
        let o = c.rn(&["task", "kill", &on_n2]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&waiting, "running");
        assert_eq!(node_of(&c, &waiting).as_deref(), Some("n2"));
    });
}

#[test]
fn a_node_cut_off_goes_offline_and_healed_runs_its_task_again_once() {
    private_namespaces(|| {
        let Some(c) = ThreeNodes::start() else {
            return;
        };
        let id = sleeper(&c, &["-t", "n3"]);
        c.wait_state(&id, "running");
        let started = c.task(&id)["started_at_unix_ms"].as_i64();
        assert!(started.is_some());

        c.link("n3", false);
        c.wait_node("n3", "offline");
        c.wait_state(&id, "lost");
        // The others are not disturbed.
        for n in ["n1", "n2"] {
            let list = nodes(&c.host_data());
            assert_eq!(node(&list, n).unwrap()["state"], "online", "{n}");
        }

        c.link("n3", true);
        c.wait_node("n3", "online");
        c.wait_state(&id, "running");
        let t = c.task(&id);
        assert_eq!(t["placement"]["node"], "n3", "it stayed where it ran");
        assert_eq!(
            t["started_at_unix_ms"].as_i64(),
            started,
            "the same run, not a new one"
        );
        // One container for it on n3, none anywhere else.
        let container = format!("n3-task-{id}");
        let listed = c.ctd("n3").ctr(&["containers", "list", "-q"]);
        assert_eq!(
            listed.lines().filter(|l| l.trim() == container).count(),
            1,
            "n3 runs it once: {listed}"
        );
        for n in ["n1", "n2"] {
            let listed = c.ctd(n).ctr(&["containers", "list", "-q"]);
            assert!(!listed.contains(&format!("task-{id}")), "{n}: {listed}");
        }
    });
}

#[test]
fn ssh_and_published_ports_through_the_host_reach_every_node() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(c) = ThreeNodes::start() else {
            return;
        };
        let key = c.dir.path().join("key");
        let known = c.dir.path().join("known_hosts");
        let mut ids = Vec::new();
        for (i, (n, _)) in NODES.iter().enumerate() {
            let key_args: Vec<String> = if i == 0 {
                vec![
                    "--gen-ssh-key".into(),
                    "--key-out-file".into(),
                    key.display().to_string(),
                ]
            } else {
                vec![
                    "--public-key-file".into(),
                    key.with_extension("pub").display().to_string(),
                ]
            };
            let mut args = vec![
                "-o",
                "json",
                "vps",
                "create",
                "--container",
                "busybox",
                "-t",
                n,
            ];
            args.extend(key_args.iter().map(String::as_str));
            let o = c.rn(&args);
            assert!(o.status.success(), "{}", stderr(&o));
            ids.push((n.to_string(), created_id(&o)));
        }
        for (n, id) in &ids {
            c.wait_state(id, "running");
            assert_eq!(node_of(&c, id).as_deref(), Some(n.as_str()));
            let said = wait_for_logged(&format!("ssh to VPS {id} on {n}"), &[&c.host], || {
                let o = c.rn(&[
                    "ssh",
                    id,
                    "-i",
                    key.to_str().unwrap(),
                    "--known-hosts",
                    known.to_str().unwrap(),
                    "--",
                    "hostname",
                ]);
                o.status.success().then(|| stdout(&o))
            });
            assert_eq!(
                said.trim(),
                format!("task-{id}"),
                "VPS {id} on {n} answered"
            );
        }
        // A published port of a task on n3 answers at the host's address.
        let web = command_on(
            &c,
            None,
            "n3",
            &["-p", "8090"],
            "mkdir -p /tmp/w && echo served-on-n3 > /tmp/w/index.html && \
             exec httpd -f -p 8090 -h /tmp/w",
        );
        c.wait_state(&web, "running");
        let line = stdout(&c.rn(&["task", "ports", &web]));
        let (outside, _) = line
            .split_once(" -> 8090/tcp")
            .unwrap_or_else(|| panic!("no 8090 in {line:?}"));
        let (host, port) = outside.trim().rsplit_once(':').unwrap();
        assert_eq!(host, common::three::HOST_IP, "{line}");
        let port: u16 = port.parse().unwrap();
        let page = wait_for_logged("the published port on n3", &[&c.host], || {
            use std::io::{Read, Write};
            let ip: std::net::Ipv4Addr = common::three::HOST_IP.parse().unwrap();
            let mut s = std::net::TcpStream::connect((ip, port)).ok()?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.contains("served-on-n3").then_some(out)
        });
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    });
}

#[test]
fn an_environment_runs_on_every_node_without_a_shared_directory_and_is_fetched_once() {
    private_namespaces(|| {
        let Some(c) = ThreeNodes::start_with(false) else {
            return;
        };
        let envs = c.dir.path().join("shared/environments");
        let blobs = oci_blobs(&envs.join("busybox.tar"));
        let all: u64 = blobs.iter().map(|b| b.1.len() as u64).sum();
        // n1 was cut off halfway through its layer in an earlier fetch: it
        // resumes.
        let (layer, bytes) = blobs.last().unwrap();
        let half = bytes.len() / 2;
        let cache = |n: &str| c.dir.path().join(format!("runner-{n}/runner/blobs"));
        std::fs::create_dir_all(cache("n1")).unwrap();
        std::fs::write(
            cache("n1").join(format!("sha256-{}.tar.part", &layer[7..])),
            &bytes[..half],
        )
        .unwrap();
        let fetches = |n: &str, env: &str| -> Vec<String> {
            c.runner(n)
                .log_text()
                .lines()
                .filter(|l| l.contains(&format!("environment \"{env}\" fetched from the host")))
                .map(str::to_string)
                .collect()
        };
        for (n, _) in NODES {
            for _ in 0..2 {
                let id = command_on(&c, None, n, &[], "echo hi");
                c.wait_state(&id, "completed");
            }
            // Fetched from the host once, blob by blob; the second run
            // fetched nothing.
            let f = fetches(n, "busybox");
            assert_eq!(f.len(), 1, "{n}: {f:?}");
            let want = if n == "n1" { all - half as u64 } else { all };
            assert_eq!(field(&f[0], "bytes"), want, "{n}: {}", f[0]);
            assert_eq!(field(&f[0], "layers_skipped"), 0, "{n}: {}", f[0]);
            // The cache keeps nothing once the image is in.
            let left: Vec<_> = std::fs::read_dir(cache(n)).unwrap().flatten().collect();
            assert!(left.is_empty(), "{n}: {left:?}");
        }
        // A second environment on the first one's layer: a node that runs
        // the first fetches only what is new.
        let second = common::containerd::busybox_with_a_layer(c.dir.path(), "busybox2");
        std::fs::copy(&second, envs.join("busybox2.tar")).unwrap();
        ran(&c, "busybox2", "n2", &["cat", "/etc/second"]);
        let f = fetches("n2", "busybox2");
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(field(&f[0], "layers_skipped"), 1, "{}", f[0]);
        assert_eq!(
            field(&f[0], "bytes_skipped"),
            bytes.len() as u64,
            "{}",
            f[0]
        );
        let new: u64 = oci_blobs(&second)
            .iter()
            .filter(|b| b.0 != *layer)
            .map(|b| b.1.len() as u64)
            .sum();
        assert_eq!(field(&f[0], "bytes"), new, "{}", f[0]);

        // A classic `docker save` archive comes whole, resumed after a cut.
        let Some(docker) =
            common::containerd::docker_archive(&envs.join("busybox.tar"), c.dir.path())
        else {
            return;
        };
        std::fs::copy(&docker, envs.join("busyboxd.tar")).unwrap();
        let archive = std::fs::read(&docker).unwrap();
        let digest = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&archive))
        };
        let half = archive.len() / 2;
        let whole = c.dir.path().join("runner-n3/runner/environments");
        std::fs::create_dir_all(&whole).unwrap();
        std::fs::write(
            whole.join(format!("sha256-{digest}.tar.part")),
            &archive[..half],
        )
        .unwrap();
        ran(&c, "busyboxd", "n3", &["echo", "hi"]);
        let log = c.runner("n3").log_text();
        let f: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("environment fetched from the host")
                    && l.contains("environment=busyboxd")
            })
            .collect();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            field(f[0], "bytes"),
            (archive.len() - half) as u64,
            "{}",
            f[0]
        );
        assert_eq!(field(f[0], "from"), half as u64, "{}", f[0]);
        assert!(whole.join(format!("sha256-{digest}.tar")).is_file());
    });
}

/// The blobs of the one image in an OCI layout archive: its manifest,
/// config and layers, by digest, in that order.
fn oci_blobs(archive: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut files = std::collections::HashMap::new();
    let mut t = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in t.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(name, data);
    }
    let json = |name: &str| -> serde_json::Value { serde_json::from_slice(&files[name]).unwrap() };
    let blob = |d: &serde_json::Value| {
        let digest = d["digest"].as_str().unwrap().to_string();
        let data = files[&format!("blobs/sha256/{}", &digest[7..])].clone();
        (digest, data)
    };
    let index = json("index.json");
    let manifest = blob(&index["manifests"][0]);
    let m: serde_json::Value = serde_json::from_slice(&manifest.1).unwrap();
    let mut out = vec![manifest, blob(&m["config"])];
    out.extend(m["layers"].as_array().unwrap().iter().map(blob));
    out
}

/// `command` in environment `env` on `node`, run to its end.
fn ran(c: &ThreeNodes, env: &str, node: &str, command: &[&str]) {
    let mut args = vec![
        "-o",
        "json",
        "task",
        "submit",
        "--container",
        env,
        "-t",
        node,
        "--",
    ];
    args.extend_from_slice(command);
    let o = c.rn(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    c.wait_state(&created_id(&o), "completed");
}

/// The number after ` name=` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("{name}: {line}"));
    let rest = &line[at + name.len() + 2..];
    rest[..rest.find(' ').unwrap_or(rest.len())]
        .parse()
        .unwrap()
}

#[test]
fn a_stopped_vps_moves_to_another_node_while_its_own_is_cut_off() {
    private_namespaces(|| {
        let Some(c) = ThreeNodes::start_opts(true, &["--park-stopped-vps"]) else {
            return;
        };
        let ann = c.add_user("ann");
        let keys = Keys::new(&c, "ann");
        // Small, so that three fit on a node here (two cores): one more
        // that ann lets move by itself, and one she does not.
        let small = ["-c", "0", "-m", "256M"];
        let id = keys.vps_with(&c, Some(&ann), "n1", &small);
        let movable = keys.vps_with(&c, Some(&ann), "n1", &[&small[..], &["--movable"]].concat());
        let pinned = keys.vps_with(&c, Some(&ann), "n1", &small);
        for v in [&id, &movable, &pinned] {
            c.wait_state(v, "running");
        }
        // Files on its disk (20 MiB: the copy travels in pieces); the host
        // key ann's ssh pins.
        let written = keys.ssh(
            &c,
            Some(&ann),
            &id,
            "echo written-on-n1 > /kept && head -c 20971520 /dev/urandom > /big && sync && sha256sum /big",
        );
        keys.ssh(
            &c,
            Some(&ann),
            &pinned,
            "echo written-on-pinned > /pinned-mark && sync",
        );
        // A snapshot of each, then a file after it: the snapshots follow
        // their VPS.
        let snapshot = |v: &str, message: &str| snapshot_of(&c, &ann, v, message);
        let before_later = snapshot(&id, "before /later");
        let pinned_mark = snapshot(&pinned, "with /pinned-mark");
        keys.ssh(&c, Some(&ann), &id, "echo later > /later && sync");
        keys.ssh(
            &c,
            Some(&ann),
            &pinned,
            "echo later > /pinned-later && sync",
        );
        let key_before = c.task(&id)["ssh_host_key"].clone();
        assert!(key_before.is_string(), "{}", c.task(&id));
        // The pinned keys, in any order (each ssh writes its own line anew).
        let known = || {
            let text = std::fs::read_to_string(&keys.known).unwrap();
            text.lines().map(str::to_string).collect::<BTreeSet<_>>()
        };
        let known_before = known();
        let anywhere = || c.rn(&["--token", &ann, "vps", "restart", &id, "--anywhere"]);
        // Running, it has no parked stop to move from.
        let o = anywhere();
        assert!(
            !o.status.success() && stderr(&o).contains("no parked copy"),
            "{}",
            stderr(&o)
        );

        // Its stop is parked on the host.
        for v in [&id, &movable, &pinned] {
            let o = c.rn(&["--token", &ann, "vps", "stop", v]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
        for v in [&id, &movable, &pinned] {
            c.wait_state(v, "stopped");
        }
        let t = c.task(&id);
        let parked = t["parked"]
            .as_str()
            .unwrap_or_else(|| panic!("not parked: {t}\n{}", c.logs()))
            .to_string();
        // The host keeps it blob by blob: its record names them.
        let store = c.dir.path().join("host/parked");
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.join(format!("vps-{id}.json"))).unwrap())
                .unwrap();
        assert_eq!(record["snapshot"], parked.as_str(), "{record}");
        let archive = record["size_bytes"].as_u64().unwrap();
        let blob_file = |d: &serde_json::Value| {
            store
                .join("blobs/sha256")
                .join(&d["digest"].as_str().unwrap()[7..])
        };
        let layers = record["blobs"].as_array().unwrap().clone();
        for b in &layers {
            assert!(blob_file(b).is_file(), "{b}");
        }
        // Its own layer (the 20 MiB), and the image's, which others share.
        let (base, own) = (&layers[1], layers.last().unwrap());
        assert!(own["size"].as_u64().unwrap() >= 20 << 20, "{record}");
        let status = stdout(&c.rn(&["--token", &ann, "vps", "status", &id]));
        assert!(
            status.contains(&format!("Parked:     snapshot {parked}")),
            "{status}"
        );
        // Its snapshots are kept with it: the one taken while it ran, and
        // the stop's.
        let kept_ids = |v: &str| -> Vec<String> {
            let r: serde_json::Value = serde_json::from_slice(
                &std::fs::read(store.join(format!("vps-{v}.json"))).unwrap(),
            )
            .unwrap();
            r["snapshots"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|k| k["id"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(kept_ids(&id), [before_later.clone(), parked.clone()]);
        // One taken while it is stopped follows it too; a deleted one not.
        let stopped_snap = snapshot(&pinned, "while stopped");
        assert!(
            kept_ids(&pinned).contains(&stopped_snap),
            "{:?}",
            kept_ids(&pinned)
        );
        let o = c.rn(&[
            "--token",
            &ann,
            "vps",
            "snapshot",
            "delete",
            &pinned,
            &stopped_snap,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            !kept_ids(&pinned).contains(&stopped_snap),
            "{:?}",
            kept_ids(&pinned)
        );
        assert!(
            kept_ids(&pinned).contains(&pinned_mark),
            "{:?}",
            kept_ids(&pinned)
        );

        // n2 and n3 run busybox already: a move there fetches only what the
        // VPS made of it, not the image's own layer.
        for n in ["n2", "n3"] {
            let t = command_on(&c, None, n, &[], "true");
            c.wait_state(&t, "completed");
        }

        // n1 is cut off: the VPS starts on another node from the copy.
        c.link("n1", false);
        c.wait_node("n1", "offline");
        // Its node cut off, the host lists what it keeps.
        assert_listed(&c, &ann, &pinned, &pinned_mark, "host");
        // A new snapshot needs its node: an answer that says so, not a wait.
        let o = c.rn(&["--token", &ann, "vps", "snapshot", "create", &pinned]);
        assert!(
            !o.status.success() && stderr(&o).contains("offline"),
            "{}",
            stderr(&o)
        );
        let o = anywhere();
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&id, "running");
        let moved_to = node_of(&c, &id).unwrap();
        assert_ne!(moved_to, "n1");
        // Its file is there, and it answers with the same host key.
        let out = keys.ssh(&c, Some(&ann), &id, "cat /kept; sha256sum /big");
        assert_eq!(out, format!("written-on-n1\n{written}"), "{}", c.logs());
        assert_eq!(c.task(&id)["ssh_host_key"], key_before);
        assert_eq!(known(), known_before);
        // It fetched the 20 MiB it wrote, and skipped the layer it had (the
        // stop's copy comes first, before its other snapshots).
        let log = c.runner(&moved_to).log_text();
        let fetch = log
            .lines()
            .find(|l| l.contains(&format!("VPS {id}'s parked copy fetched from the host")))
            .unwrap_or_else(|| panic!("no fetch logged on {moved_to}:\n{log}"));
        let fetched = |name: &str| field(fetch, name);
        assert!(fetched("layers_skipped") >= 1, "{fetch}");
        assert!(fetched("bytes_skipped") > 0, "{fetch}");
        assert!(fetched("bytes") >= 20 << 20, "{fetch}");
        assert!(
            fetched("bytes") + fetched("bytes_skipped") <= archive,
            "{fetch}"
        );
        // Its snapshots came along: they are the VPS's snapshots there, and
        // it goes back to the older one there, n1 still cut off.
        assert_listed(&c, &ann, &id, &parked, &moved_to);
        let out = restored_there(&c, (&keys, &ann), &id, &before_later, &moved_to);
        assert_eq!(out, "written-on-n1\nno-later\n", "{}", c.logs());

        // A new VPS from the parked copy of one whose node is gone: on any
        // node, with what that one wrote and a host key of its own.
        let clone = keys.vps_from_snapshot(&c, &ann, &format!("{pinned}:{pinned_mark}"), &[]);
        assert_ne!(node_of(&c, &clone).as_deref(), Some("n1"));
        // From the snapshot taken while it ran: before its last file.
        let out = keys.ssh(
            &c,
            Some(&ann),
            &clone,
            "cat /pinned-mark; cat /pinned-later || echo no-later",
        );
        assert_eq!(out, "written-on-pinned\nno-later\n");
        assert_ne!(
            c.task(&clone)["ssh_host_key"],
            c.task(&pinned)["ssh_host_key"]
        );

        // A plain restart moves the movable one; the other waits for n1.
        for v in [&movable, &pinned] {
            let o = c.rn(&["--token", &ann, "vps", "restart", v]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
        c.wait_state(&movable, "running");
        assert_ne!(node_of(&c, &movable).as_deref(), Some("n1"));
        // (The pass that placed the movable one would have placed it too.)
        assert_eq!(c.task(&pinned)["state"], "pending", "{}", c.task(&pinned));
        assert_eq!(node_of(&c, &pinned).as_deref(), Some("n1"));

        // n1 comes back: the VPS runs where it moved, once; n1 keeps its
        // old container and snapshots (the VPS's older state) until a delete.
        c.link("n1", true);
        c.wait_node("n1", "online");
        let left_on_n1 = |what: &str| {
            let mut args = vec![what, "ls", "-q"];
            if what == "containers" {
                args = vec!["containers", "list", "-q"];
            }
            c.ctd("n1")
                .ctr(&args)
                .lines()
                .filter(|l| l.contains(&format!("task-{id}")) || l.contains(&format!("vps-{id}:")))
                .count()
        };
        assert_eq!(left_on_n1("containers"), 1, "n1's old container is kept");
        assert!(left_on_n1("images") >= 1, "n1's old snapshots are kept");
        let out = keys.ssh(&c, Some(&ann), &id, "cat /kept; hostname");
        assert!(out.contains("written-on-n1"), "{out}");
        assert_eq!(node_of(&c, &id).as_deref(), Some(moved_to.as_str()));
        assert_eq!(c.task(&id)["state"], "running");
        c.wait_state(&pinned, "running");
        assert_eq!(
            node_of(&c, &pinned).as_deref(),
            Some("n1"),
            "it waited for its node"
        );

        // A movable VPS whose node is full moves too, on a plain restart.
        let full = keys.vps_with(
            &c,
            Some(&ann),
            "n1",
            &["-c", "1", "-m", "256M", "--movable"],
        );
        c.wait_state(&full, "running");
        keys.ssh(&c, Some(&ann), &full, "echo was-on-n1 > /kept && sync");
        let o = c.rn(&["--token", &ann, "vps", "stop", &full]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&full, "stopped");
        assert!(c.task(&full)["parked"].is_string(), "{}", c.task(&full));
        // The host had the image's layer: this park sent only its own.
        let log = c.runner("n1").log_text();
        let park = log
            .lines()
            .find(|l| l.contains("VPS parked on the host") && l.contains(&format!("task={full} ")))
            .unwrap_or_else(|| panic!("no park of {full} logged:\n{log}"));
        assert!(field(park, "blobs_held") >= 1, "{park}");
        // Its core is taken meanwhile (the other stays for the shared ones).
        let filler = command_on(&c, None, "n1", &["-c", "1", "-m", "64M"], "sleep 600");
        c.wait_state(&filler, "running");
        let o = c.rn(&["--token", &ann, "vps", "restart", &full]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&full, "running");
        assert_ne!(node_of(&c, &full).as_deref(), Some("n1"));
        let reason = c.task(&full)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(reason.contains("moved from n1"), "{reason}");
        assert_eq!(keys.ssh(&c, Some(&ann), &full, "cat /kept"), "was-on-n1\n");

        // A delete removes the host's copy.
        let o = c.rn(&["--token", &ann, "vps", "delete", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&id, "deleted");
        // ...and n1 removes what the VPS left there.
        wait_for_logged("n1 removing what the VPS left", &[&c.host], || {
            (left_on_n1("containers") == 0 && left_on_n1("images") == 0).then_some(())
        });
        // The host's record goes, and its own layer; the shared one stays.
        wait_for("the host's copy removed", || {
            let gone = !store.join(format!("vps-{id}.json")).exists();
            (gone && !blob_file(own).exists()).then_some(())
        });
        assert!(blob_file(base).is_file(), "the other copies' layer is kept");
    });
}

#[test]
fn a_stopped_vps_moves_node_to_node_when_the_host_keeps_no_copy() {
    private_namespaces(|| {
        // The host parks nothing here: a move goes from node to node.
        let Some(c) = ThreeNodes::start_opts(true, &[]) else {
            return;
        };
        let ann = c.add_user("ann");
        let keys = Keys::new(&c, "ann");
        let id = keys.vps_with(&c, Some(&ann), "n1", &["-c", "1", "-m", "256M"]);
        c.wait_state(&id, "running");
        let written = keys.ssh(
            &c,
            Some(&ann),
            &id,
            "echo written-on-n1 > /kept && head -c 8388608 /dev/urandom > /big && sync && sha256sum /big",
        );
        let before = snapshot_of(&c, &ann, &id, "before /later");
        keys.ssh(&c, Some(&ann), &id, "echo later > /later && sync");
        let key_before = c.task(&id)["ssh_host_key"].clone();
        // n2 and n3 run busybox already: the image's layer does not travel.
        for n in ["n2", "n3"] {
            let t = command_on(&c, None, n, &[], "true");
            c.wait_state(&t, "completed");
        }
        let o = c.rn(&["--token", &ann, "vps", "stop", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&id, "stopped");
        assert!(c.task(&id)["parked"].is_null(), "{}", c.task(&id));
        // Its core is taken meanwhile: it must go elsewhere.
        let filler = command_on(&c, None, "n1", &["-c", "2", "-m", "64M"], "sleep 600");
        c.wait_state(&filler, "running");
        let o = c.rn(&["--token", &ann, "vps", "restart", &id, "--anywhere"]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(&id, "running");
        let moved_to = node_of(&c, &id).unwrap();
        assert_ne!(moved_to, "n1");
        // Its files, as it stopped, and the same host key.
        let out = keys.ssh(&c, Some(&ann), &id, "cat /kept; sha256sum /big; cat /later");
        assert_eq!(
            out,
            format!("written-on-n1\n{written}later\n"),
            "{}",
            c.logs()
        );
        assert_eq!(c.task(&id)["ssh_host_key"], key_before);
        // It came from n1's runner, not the host, with the image's layer
        // skipped.
        let log = c.runner(&moved_to).log_text();
        let fetch = log
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "VPS {id}'s snapshots on node n1 fetched from node n1"
                ))
            })
            .unwrap_or_else(|| panic!("no fetch from n1 logged on {moved_to}:\n{log}"));
        assert!(field(fetch, "layers_skipped") >= 1, "{fetch}");
        assert!(field(fetch, "bytes") >= 8 << 20, "{fetch}");
        let n1 = c.runner("n1").log_text();
        assert!(
            n1.lines()
                .any(|l| l.contains("a blob sent to the node a VPS moves to")
                    && l.contains(&format!("to={moved_to}"))),
            "{n1}"
        );
        // Its snapshot came with it, and restores there.
        let out = restored_there(&c, (&keys, &ann), &id, &before, &moved_to);
        assert_eq!(out, "written-on-n1\nno-later\n", "{}", c.logs());

        // A new VPS from that snapshot on the third node, which has none of
        // it: it comes from the node that keeps it, without its host key.
        let third = ["n2", "n3"].into_iter().find(|n| *n != moved_to).unwrap();
        let clone = keys.vps_from_snapshot(&c, &ann, &format!("{id}:{before}"), &["-t", third]);
        let out = keys.ssh(
            &c,
            Some(&ann),
            &clone,
            "cat /kept; cat /later || echo no-later",
        );
        assert_eq!(out, "written-on-n1\nno-later\n");
        let clone_key = c.task(&clone)["ssh_host_key"].clone();
        assert!(
            clone_key.is_string() && clone_key != key_before,
            "{clone_key}"
        );
        // The grant was for that snapshot alone.
        let source_log = c.runner(&moved_to).log_text();
        let given = source_log
            .lines()
            .find(|l| l.contains("a move's grant given") && l.contains(&format!("to={third}")))
            .unwrap_or_else(|| panic!("no grant to {third} logged:\n{source_log}"));
        assert_eq!(field(given, "snapshots"), 1, "{given}");
        let log = c.runner(third).log_text();
        assert!(
            log.lines().any(|l| l.contains(&format!(
                "VPS {id}'s snapshots on node {moved_to} fetched from node {moved_to}"
            ))),
            "{log}"
        );
    });
}

/// VPS `id` (`token`'s, on `node`), listing `snapshot` there, stopped and
/// restarted from it; what `/kept` and `/later` then hold.
fn restored_there(
    c: &ThreeNodes,
    (keys, token): (&Keys, &str),
    id: &str,
    snapshot: &str,
    node: &str,
) -> String {
    assert_listed(c, token, id, snapshot, node);
    let o = c.rn(&["--token", token, "vps", "stop", id]);
    assert!(o.status.success(), "{}", stderr(&o));
    c.wait_state(id, "stopped");
    let o = c.rn(&[
        "--token",
        token,
        "vps",
        "restart",
        id,
        "--from-snapshot",
        snapshot,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    c.wait_state(id, "running");
    assert_eq!(node_of(c, id).as_deref(), Some(node));
    keys.ssh(c, Some(token), id, "cat /kept; cat /later || echo no-later")
}

/// `vps snapshot list` of `id` (as `token`'s user) has `snapshot` on `node`.
fn assert_listed(c: &ThreeNodes, token: &str, id: &str, snapshot: &str, node: &str) {
    let o = c.rn(&[
        "--token", token, "-o", "json", "vps", "snapshot", "list", id,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let snaps: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == snapshot && x["node"] == node),
        "{snapshot} on {node}: {snaps}"
    );
}

/// `vps snapshot create` of `id` as `token`'s user, with `message`; its id.
fn snapshot_of(c: &ThreeNodes, token: &str, id: &str, message: &str) -> String {
    let o = c.rn(&[
        "--token", token, "-o", "json", "vps", "snapshot", "create", id, "-m", message,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    s["id"].as_str().unwrap().to_string()
}

/// `task submit` of a busybox command on `node`, as `token`'s user (none:
/// the admin); its id.
fn command_on(
    c: &ThreeNodes,
    token: Option<&str>,
    node: &str,
    extra: &[&str],
    script: &str,
) -> String {
    let mut rest = extra.to_vec();
    rest.extend(["--", "sh", "-c", script]);
    busybox_on(c, token, &["task", "submit"], node, &rest)
}

/// `verb` (`task submit`, `vps create`) of a busybox instance on `node`
/// with `rest` after the common flags, as `token`'s user (none: the
/// admin); its id.
fn busybox_on(
    c: &ThreeNodes,
    token: Option<&str>,
    verb: &[&str],
    node: &str,
    rest: &[&str],
) -> String {
    let mut args = vec![];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    args.extend(["-o", "json"]);
    args.extend_from_slice(verb);
    args.extend(["--container", "busybox", "-t", node]);
    args.extend_from_slice(rest);
    let o = c.rn(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    created_id(&o)
}

fn overlay(c: &ThreeNodes) -> serde_json::Value {
    let o = c.rn(&["-o", "json", "node", "overlay"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// One person's SSH key and known hosts, for their VPS.
struct Keys {
    key: std::path::PathBuf,
    known: std::path::PathBuf,
}

impl Keys {
    fn new(c: &ThreeNodes, who: &str) -> Keys {
        let key = c.dir.path().join(format!("{who}_key"));
        let o = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        Keys {
            known: c.dir.path().join(format!("{who}_known_hosts")),
            key,
        }
    }

    /// A busybox VPS with this key on `node`, as `token`'s user (none: the admin).
    fn vps_on(&self, c: &ThreeNodes, token: Option<&str>, node: &str) -> String {
        self.vps_with(c, token, node, &[])
    }

    /// The same with `extra` flags for `vps create`.
    fn vps_with(&self, c: &ThreeNodes, token: Option<&str>, node: &str, extra: &[&str]) -> String {
        let key = self.key.with_extension("pub");
        let mut rest = vec!["--public-key-file", key.to_str().unwrap()];
        rest.extend_from_slice(extra);
        busybox_on(c, token, &["vps", "create"], node, &rest)
    }

    /// A small VPS of `token`'s user from snapshot `source` (`VPS:SNAPSHOT`)
    /// with this key, `extra` flags added, running; its id.
    fn vps_from_snapshot(
        &self,
        c: &ThreeNodes,
        token: &str,
        source: &str,
        extra: &[&str],
    ) -> String {
        let public = self.key.with_extension("pub");
        let mut args = vec!["--token", token, "-o", "json", "vps", "create"];
        args.extend(["--from-snapshot", source, "-c", "0", "-m", "256M"]);
        args.extend(["--public-key-file", public.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = c.rn(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let id = created_id(&o);
        c.wait_state(&id, "running");
        id
    }

    /// `script` in VPS `id` through the host's SSH proxy; what it printed.
    fn ssh(&self, c: &ThreeNodes, token: Option<&str>, id: &str, script: &str) -> String {
        wait_for_logged(&format!("ssh to VPS {id}"), &[&c.host], || {
            let mut args = vec![];
            if let Some(t) = token {
                args.extend(["--token", t]);
            }
            args.extend(["ssh", id, "-i", self.key.to_str().unwrap()]);
            args.extend(["--known-hosts", self.known.to_str().unwrap(), "--", script]);
            let o = c.rn(&args);
            o.status.success().then(|| stdout(&o))
        })
    }
}

/// `id` ended having read the page of the server on n1.
fn fetched_from_n1(c: &ThreeNodes, id: &str) {
    assert_eq!(
        ended(c, id),
        ("completed".to_string(), "from-n1\n".to_string()),
        "{}",
        c.logs()
    );
}

/// Waits until `id` has ended; its state and its output.
fn ended(c: &ThreeNodes, id: &str) -> (String, String) {
    let state = wait_for_logged(&format!("task {id} to end"), &[&c.host], || {
        let s = c.task(id)["state"].as_str().unwrap_or_default().to_string();
        ["completed", "failed"].contains(&s.as_str()).then_some(s)
    });
    (state, stdout(&c.rn(&["task", "logs", id])))
}

#[test]
fn one_users_instances_talk_across_nodes_over_the_overlay_and_others_do_not() {
    private_namespaces(|| {
        let Some(c) = ThreeNodes::start_opts(true, &["--overlay-range", "10.200.0.0/16"]) else {
            return;
        };
        // Every node took a subnet of the range and is in the mesh.
        let o = overlay(&c);
        assert_eq!(o["range"], "10.200.0.0/16");
        let members = o["nodes"].as_array().unwrap();
        let subnets: BTreeSet<&str> = members
            .iter()
            .map(|n| n["subnet"].as_str().unwrap())
            .collect();
        assert_eq!(subnets.len(), 3, "{o}");
        assert!(members.iter().all(|n| n["in_mesh"] == true), "{o}");
        let table = stdout(&c.rn(&["node", "overlay"]));
        assert!(
            table.contains("IN MESH") && table.contains("10.77.0.12"),
            "{table}"
        );

        // Two VPS of the admin's, on n1 and on n2, and one of ann's on n3.
        let ann = c.add_user("ann");
        let admins = Keys::new(&c, "admin");
        let anns = Keys::new(&c, "ann");
        let server = admins.vps_on(&c, None, "n1");
        let peer = admins.vps_on(&c, None, "n2");
        let other = anns.vps_on(&c, Some(&ann), "n3");
        for id in [&server, &peer, &other] {
            c.wait_state(id, "running");
        }
        // A web server in the one on n1, at its address on n1's subnet.
        let n1_subnet = members.iter().find(|n| n["node"] == "n1").unwrap()["subnet"]
            .as_str()
            .unwrap()
            .trim_end_matches("0/24")
            .to_string();
        let said = admins.ssh(
            &c,
            None,
            &server,
            "mkdir -p /tmp/w && echo from-n1 > /tmp/w/index.html && \
             httpd -p 8080 -h /tmp/w && ip -4 -o addr show eth0",
        );
        let at = said.find("inet ").unwrap_or_else(|| panic!("{said}"));
        let addr = said[at + 5..].split('/').next().unwrap().to_string();
        assert!(
            addr.starts_with(&n1_subnet),
            "{addr} not in {n1_subnet}0/24"
        );
        let fetch =
            format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {addr} 8080 | tail -n 1");
        // The admin's VPS on n2 reaches it across the overlay...
        assert_eq!(admins.ssh(&c, None, &peer, &fetch).trim(), "from-n1");
        // ...as does the admin's task on n3; ann's VPS on n3 does not.
        let near = command_on(&c, None, "n3", &[], &fetch);
        fetched_from_n1(&c, &near);
        let out = anns.ssh(&c, Some(&ann), &other, &format!("{fetch}; echo tried"));
        assert!(
            out.contains("tried") && !out.contains("from-n1"),
            "ann's VPS reached the admin's: {out}"
        );

        // A node that leaves is dropped from the mesh; back, it is in it
        // again, and its instances reach the others once more.
        c.link("n3", false);
        c.wait_node("n3", "offline");
        let o = overlay(&c);
        let n3 = o["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "n3")
            .unwrap()
            .clone();
        assert_eq!(n3["in_mesh"], false, "{o}");
        c.link("n3", true);
        c.wait_node("n3", "online");
        let back = command_on(&c, None, "n3", &[], &format!("sleep 2; {fetch}"));
        fetched_from_n1(&c, &back);
    });
}

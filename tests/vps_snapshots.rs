//! VPS snapshots end to end on real containerd in private namespaces:
//! restore in place and into a new VPS, and rotation on stop.

mod common;

use common::cluster::*;
use common::*;

#[test]
fn snapshots_bring_back_a_deleted_file_and_seed_a_new_vps() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut v) = Vps::start("vps-h") else {
            return;
        };
        let id = v.create();
        v.ssh_ok(
            &id,
            &["echo precious > /root/keep && head -c 3000000 /dev/urandom > /root/blob && echo ok"],
        );
        let s1 = v.json(&[
            "vps",
            "snapshot",
            "create",
            &id,
            "-m",
            "before the accident",
        ]);
        let s1_id = s1["id"].as_str().unwrap().to_string();
        // The layer holds the changes (3 MB of random bytes), not the image under them.
        let size = s1["size_bytes"].as_u64().unwrap();
        assert!(
            (3_000_000..3_400_000).contains(&size),
            "layer of {size} bytes"
        );
        assert_eq!(s1["message"], "before the accident");
        v.ssh_ok(&id, &["rm /root/keep"]);

        // Two in the same second: distinct, ordered; latest is the newer.
        let s2 = v.json(&["vps", "snapshot", "create", &id]);
        let s3 = v.json(&["vps", "snapshot", "create", &id]);
        let (s2_id, s3_id) = (s2["id"].as_str().unwrap(), s3["id"].as_str().unwrap());
        assert!(s2_id.parse::<u64>().unwrap() < s3_id.parse::<u64>().unwrap());
        assert_eq!(v.json(&["vps", "snapshot", "latest", &id])["id"], s3_id);

        // Bad requests say what is wrong and change nothing.
        let o = v.rn(&["vps", "snapshot", "delete", &id, "123"]);
        assert!(
            stderr(&o).contains("has no snapshot 123") && stderr(&o).contains("404"),
            "{}",
            stderr(&o)
        );
        let o = v.rn(&["vps", "snapshot", "create", "999"]);
        assert!(stderr(&o).contains("no task 999"), "{}", stderr(&o));
        let o = v.rn(&[
            "-o",
            "json",
            "task",
            "submit",
            "--container",
            "busybox",
            "--",
            "true",
        ]);
        let cmd_id = created_id(&o);
        let o = v.rn(&["vps", "snapshot", "list", &cmd_id]);
        assert!(
            stderr(&o).contains("only a VPS has snapshots") && stderr(&o).contains("400"),
            "{}",
            stderr(&o)
        );
        assert_eq!(v.snapshot_ids(&id).len(), 3);

        // Stop takes a snapshot of its own; restart from the first brings the file back.
        v.rn(&["vps", "stop", &id]);
        v.wait_state(&id, "stopped");
        let all = v.json(&["vps", "snapshot", "list", &id]);
        assert_eq!(all[3]["message"], "automatic, on stop", "{all}");
        let o = v.rn(&["vps", "restart", &id, "--from-snapshot", &s1_id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["cat", "/root/keep"]), "precious\n");

        // A new VPS from that snapshot has the file too.
        let o = v.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--from-snapshot",
            &format!("{id}:{s1_id}"),
            "--public-key-file",
            v.key.with_extension("pub").to_str().unwrap(),
        ]);
        let copy = created_id(&o);
        v.wait_state(&copy, "running");
        assert_eq!(v.ssh_ok(&copy, &["cat", "/root/keep"]), "precious\n");
        let o = v.rn(&[
            "vps",
            "create",
            "--from-snapshot",
            &format!("{id}:77"),
            "--public-key-file",
            v.key.with_extension("pub").to_str().unwrap(),
        ]);
        assert!(stderr(&o).contains("has no snapshot 77"), "{}", stderr(&o));

        // Snapshots live in containerd, listed by label: a runner restart keeps them.
        let before = v.snapshot_ids(&id);
        v.runner.as_mut().unwrap().kill();
        // As if the runner died while a snapshot held the VPS frozen: it is thawed on adoption.
        v.ctr(&["task", "pause", &format!("vps-h-task-{id}")]);
        assert!(v.ctr(&["task", "ls"]).contains("PAUSED"));
        v.start_runner();
        let after = wait_for("the runner back", || {
            let o = v.rn(&["-o", "json", "vps", "snapshot", "list", &id]);
            o.status.success().then(|| v.snapshot_ids(&id))
        });
        assert_eq!(before, after);
        assert_eq!(v.ssh_ok(&id, &["echo", "thawed"]), "thawed\n");
        assert_eq!(v.state(&id), "running");

        // Deleting the VPS deletes its snapshots; the copy keeps running on its own disk.
        v.delete(&id);
        wait_for("its snapshot images gone", || {
            (!v.ctr(&["images", "ls", "-q"])
                .contains(&format!("vps-{id}:")))
            .then_some(())
        });
        assert_eq!(v.ssh_ok(&copy, &["cat", "/root/keep"]), "precious\n");
        v.json(&["vps", "snapshot", "create", &copy]);
        v.delete(&copy);
    });
}

#[test]
fn stopping_seven_times_keeps_the_five_newest_snapshots() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-i") else { return };
        let id = v.create();
        let mut taken = Vec::new();
        for round in 0..7 {
            v.rn(&["vps", "stop", &id]);
            v.wait_state(&id, "stopped");
            taken.push(
                v.json(&["vps", "snapshot", "latest", &id])["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            if round < 6 {
                v.rn(&["vps", "restart", &id]);
                v.wait_state(&id, "running");
            }
        }
        assert_eq!(
            v.snapshot_ids(&id),
            taken[2..],
            "the five newest of {taken:?}"
        );
        let images = v.ctr(&["images", "ls", "-q"]);
        assert_eq!(images.matches(&format!("vps-{id}:")).count(), 5, "{images}");
        v.delete(&id);
    });
}

#[test]
fn an_id_handed_out_again_inherits_no_snapshot_and_no_log() {
    // L8: after the host's database is reset, ids start again; what the
    // node still has under an id belongs to its earlier owner.
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-l") else {
            return;
        };
        let id = v.create();
        let s = v.json(&["vps", "snapshot", "create", &id]);
        let image = s["image"].as_str().unwrap().to_string();
        // The earlier life of the next id: a snapshot and a log of its own.
        let next = (id.parse::<u64>().unwrap() + 1).to_string();
        v.ctr(&[
            "images",
            "label",
            &image,
            &format!("io.rivernode.snapshot.vps={next}"),
        ]);
        let logs = v.runner_data().join("runner/logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(
            logs.join(format!("task-{next}.stdout")),
            "the earlier owner's secret\n",
        )
        .unwrap();
        // Its new life fails to fetch its image (nothing listens on port 1):
        // what it finds here was set aside before that.
        let public = v.key.with_extension("pub");
        let o = v.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--image",
            "127.0.0.1:1/none:1",
            "--public-key-file",
            public.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(created_id(&o), next);
        v.wait_state(&next, "failed");
        let listed = v.json(&["vps", "snapshot", "list", &next]);
        assert_eq!(listed, serde_json::json!([]), "no inherited snapshot");
        // It never ran, so it has no log at all (the earlier one is not its).
        let o = v.rn(&["task", "logs", &next]);
        assert!(!stdout(&o).contains("secret"), "{}", stdout(&o));
        assert!(stderr(&o).contains("no logs"), "{}", stderr(&o));
        // Set aside, not deleted.
        assert!(
            v.ctr(&["images", "ls"])
                .contains(&format!("set-aside-{next}")),
            "the snapshot is kept, labelled"
        );
        let aside = std::fs::read_dir(&logs).unwrap().flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(&format!("task-{next}.stdout.set-aside-"))
        });
        assert!(aside, "the log is kept, renamed");
    });
}

#[test]
fn a_container_of_an_earlier_task_with_the_same_id_is_left_alone() {
    // After a host database reset a new task N meets the node's container of
    // the earlier task N: never adopted, started or removed for the new one.
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut v) = Vps::start("vps-m") else {
            return;
        };
        let id = v.create();
        let cid = format!("vps-m-task-{id}");
        // As if the earlier life's task had been submitted at another time.
        v.ctr(&["containers", "label", &cid, "io.rivernode.submitted-ms=1"]);
        v.restart_runner(None);
        v.wait_state(&id, "failed");
        let t = v.json(&["task", "status", &id]);
        assert!(
            t["message"]
                .as_str()
                .unwrap_or_default()
                .contains("earlier task"),
            "{t}"
        );
        assert!(v.ctr(&["containers", "ls", "-q"]).contains(&cid));
        // Deleting the new one removes nothing of the earlier owner's.
        assert!(v.rn(&["vps", "delete", &id]).status.success());
        wait_for("deleted", || (v.state(&id) == "deleted").then_some(()));
        assert!(
            v.ctr(&["containers", "ls", "-q"]).contains(&cid),
            "the earlier disk stays"
        );
    });
}

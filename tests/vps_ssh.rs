//! Container VPS reached over SSH, end to end on real parts and each test in
//! private namespaces: dropbear injected into busybox or an image's own sshd,
//! stock OpenSSH, scp and sessions through the host's proxy, fences around
//! the node's APIs, and sessions that outlive a runner crash.

mod common;

use common::cluster::*;
use common::*;

#[test]
fn a_busybox_vps_answers_stock_ssh_and_scp_through_the_proxy() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-a") else { return };
        let id = v.create_with(&[
            "-e",
            "TZ=UTC",
            "-e",
            "TASKID=TEST",
            "-e",
            "NOTE=two words",
            "--hostname",
            "billybob",
        ]);
        assert_eq!(v.ssh_ok(&id, &["echo", "ok"]), "ok\n");
        // Vast.ai's -h: the instance's hostname, and it resolves inside.
        assert_eq!(
            v.ssh_ok(&id, &["cat", "/proc/sys/kernel/hostname"]),
            "billybob\n"
        );
        let hosts = v.ssh_ok(&id, &["cat", "/etc/hosts"]);
        assert!(hosts.contains("127.0.1.1\tbillybob "), "{hosts}");
        refused(
            &v,
            &["--hostname", "under_score"],
            "hostname: \"under_score\"",
        );
        session_sees_the_instances_variables(&v, &id);
        // The instance has a resolver configuration and a hosts file of its own.
        let resolv = v.ssh_ok(&id, &["cat", "/etc/resolv.conf", "/etc/hosts"]);
        assert!(
            resolv.contains("nameserver ") && !resolv.contains("nameserver 127."),
            "{resolv}"
        );
        assert!(
            resolv.contains("localhost") && resolv.contains(&format!("vps-a-task-{id}")),
            "{resolv}"
        );
        let status: serde_json::Value =
            serde_json::from_slice(&v.rn(&["-o", "json", "task", "status", &id]).stdout).unwrap();
        let key = status["ssh_host_key"]
            .as_str()
            .expect("the runner reports the host key")
            .to_string();
        assert!(key.starts_with("ssh-ed25519 "), "{key}");
        let known = std::fs::read_to_string(&v.known_hosts).unwrap();
        assert!(
            known
                .lines()
                .any(|l| l == format!("rivernode-vps-{id} {key}")),
            "the reported key is pinned: {known}"
        );

        // ssh config entries work with stock ssh and scp (files in and back, bytes identical).
        let cfg = v.ssh_config("ssh_config");
        let entry = format!("rivernode-vps-{id}");
        assert_eq!(
            Vps::with_config(&cfg, &["ssh", &entry, "echo", "via-config"]),
            "via-config\n"
        );
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        assert!(
            v.scp_round_trip(&cfg, &entry, "/tmp/payload", &data) == data,
            "scp round trip"
        );

        // No key, no login: passwords are off.
        let o = v.rn(&[
            "ssh",
            &id,
            "--known-hosts",
            v.known_hosts.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert!(!o.status.success());

        let o = v.rn(&["vps", "delete", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "deleted");
        let runner = v.runner_data();
        wait_for("its network gone", || {
            let leases =
                std::fs::read_to_string(runner.join("runner/ipam.json")).unwrap_or_default();
            let netns = std::fs::read_dir(runner.join("runner/netns"))
                .map(|d| d.count())
                .unwrap_or(0);
            (!leases.contains("task") && netns == 0).then_some(())
        });
        let o = v.ssh(&id, &["true"]);
        assert!(
            stderr(&o).contains(&format!("ERROR instance {id} is deleted")),
            "{}",
            stderr(&o)
        );
        // Nothing left: no container (nor its snapshot), no veth, no node port rule.
        assert_eq!(v.ctr(&["containers", "ls", "-q"]).trim(), "");
        assert!(!v
            .ctr(&["snapshots", "ls"])
            .contains(&format!("vps-a-task-{id}")));
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&links.stdout)
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .any(|n| n.starts_with("rv") && !n.starts_with("rvt9")),
            "no veth left"
        );
        wait_for("no node port left", || {
            let nft = std::process::Command::new("nft")
                .args(["list", "table", "inet", "rivernode"])
                .output()
                .unwrap();
            (!String::from_utf8_lossy(&nft.stdout).contains("dnat ip to")).then_some(())
        });
    });
}

#[test]
fn a_vps_cannot_reach_the_node_apis_and_pause_freezes_it() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-b") else { return };
        let id = v.create();
        v.ssh_ok(&id, &["true"]);
        let port_of = |url: &str| {
            url.rsplit(':')
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_string()
        };
        let runner_url = node(&nodes(&v.host_data()), "vps-b").unwrap()["runner_url"]
            .as_str()
            .unwrap()
            .to_string();
        // A node service nobody protects: the control showing the path itself works.
        let open = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let open_port = open.local_addr().unwrap().port().to_string();
        // It greets and hangs up, so a probe sees that it got through.
        std::thread::spawn(move || {
            for c in open.incoming().flatten() {
                use std::io::Write;
                let mut c = c;
                let _ = c.write_all(b"hello\n");
            }
        });
        // "open" when anything came back (the greeting, an HTTP answer, the
        // proxy's ERROR line); a dropped SYN gives nothing within 3 s.
        let reach = |port: &str| {
            // One string: ssh hands the remote shell a single command line.
            let o = v.ssh(
                &id,
                &[&format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 10.253.0.1 {port}"
                )],
            );
            if stdout(&o).trim().is_empty() {
                "closed"
            } else {
                "open"
            }
        };
        assert_eq!(reach(&open_port), "open");
        assert_eq!(
            reach(&port_of(&runner_url)),
            "closed",
            "the runner API is closed to instances"
        );
        assert_eq!(
            reach(&port_of(&v.url)),
            "closed",
            "the host API is closed to instances"
        );
        let proxy = v.json(&["whoami"])["ssh_proxy_port"].to_string();
        assert_eq!(
            reach(&proxy),
            "closed",
            "the host's SSH proxy is closed to instances"
        );

        // Paused, its processes are frozen: a login cannot complete.
        let login = || {
            let key = v.key.to_str().unwrap().to_string();
            let known = v.known_hosts.to_str().unwrap().to_string();
            let data = v.host_data();
            std::process::Command::new("timeout")
                .arg("8")
                .arg(BIN)
                .args([
                    "--data-dir",
                    data.to_str().unwrap(),
                    "ssh",
                    &id,
                    "-i",
                    &key,
                    "--known-hosts",
                    &known,
                    "--",
                    "echo",
                    "in",
                ])
                .env("HOME", "/nonexistent")
                .output()
                .unwrap()
        };
        v.rn(&["task", "pause", &id]);
        v.wait_state(&id, "paused");
        assert!(!login().status.success(), "no login into a paused VPS");
        v.rn(&["task", "resume", &id]);
        v.wait_state(&id, "running");
        assert_eq!(stdout(&login()), "in\n", "after resume it answers again");
    });
}

#[test]
fn an_ssh_session_survives_kill_9_of_the_runner_and_nothing_is_duplicated() {
    use std::io::{BufRead, BufReader};
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut v) = Vps::start("vps-c") else {
            return;
        };
        let id = v.create();
        v.ssh_ok(&id, &["true"]);
        let data = v.host_data();
        let mut session = std::process::Command::new(BIN)
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "ssh",
                &id,
                "-i",
                v.key.to_str().unwrap(),
            ])
            .args(["--known-hosts", v.known_hosts.to_str().unwrap(), "--"])
            .arg("i=0; while [ $i -lt 25 ]; do echo $i; i=$((i+1)); sleep 0.2; done")
            .env("HOME", "/nonexistent")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "0");
        // The runner dies mid-session and comes back.
        v.runner.as_mut().unwrap().kill();
        v.start_runner();
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        assert_eq!(
            rest.last().map(String::as_str),
            Some("24"),
            "the session streamed to the end: {rest:?}\n{}",
            v.logs()
        );
        assert_eq!(rest.len(), 24, "no line lost: {rest:?}");
        let status = session.wait().unwrap();
        assert!(status.success(), "{status}\n{}", v.logs());

        // Re-adopted, not recreated: one container, one veth, the node port once.
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["echo", "again"]), "again\n");
        let (containers, veths, _) = v.leftovers();
        assert_eq!((containers, veths), (1, 1), "{}", v.logs());
        let nft = std::process::Command::new("nft")
            .args(["list", "table", "inet", "rivernode"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&nft.stdout);
        assert_eq!(
            rules.matches("dnat ip to").count(),
            2,
            "prerouting + output, once each: {rules}"
        );
    });
}

#[test]
fn a_debian_vps_runs_its_own_sshd_with_keys_and_a_password() {
    if !parts_present() {
        return;
    }
    let Some(debian) = common::containerd::debian_sshd_archive() else {
        return;
    };
    private_namespaces(move || {
        let Some(v) = Vps::start("vps-g") else { return };
        std::fs::copy(&debian, v.dir.path().join("shared/environments/debian.tar")).unwrap();
        // A key for the user, and a password too.
        let o = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&v.key)
            .output()
            .unwrap();
        assert!(o.status.success());
        let data = v.host_data();
        let o = cli_with_stdin(
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "-o",
                "json",
                "vps",
                "create",
                "--container",
                "debian",
                "--public-key-file",
                v.key.with_extension("pub").to_str().unwrap(),
                "--password-stdin",
                "-e",
                "TZ=UTC",
                "-e",
                "TASKID=TEST",
                "-e",
                "NOTE=two words",
                // bash syntax, with no #! line: run by the image's bash.
                "--onstart-cmd",
                "words=(one two); echo \"${words[1]}\" > /root/onstart.out",
            ],
            "debian pass\n",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let id = created_id(&o);
        v.wait_state(&id, "running");
        // The image's own OpenSSH server answers, under our configuration.
        let cmdline = v.ssh_ok(&id, &["tr '\\0' ' ' </proc/1/cmdline"]);
        assert!(
            // sshd rewrites its process title: "sshd: /usr/sbin/sshd -D ... [listener] ...".
            cmdline.contains("/usr/sbin/sshd -D -e -f /.rivernode/instance/sshd_config"),
            "{cmdline}"
        );
        session_sees_the_instances_variables(&v, &id);
        let ran = wait_for("the onstart ran under bash", || {
            let o = v.ssh(&id, &["cat", "/root/onstart.out"]);
            o.status.success().then(|| stdout(&o))
        });
        assert_eq!(ran, "two\n");
        let banner = v.ssh_ok(&id, &["echo $SSH_CONNECTION; cat /etc/debian_version"]);
        assert!(
            banner.lines().nth(1).unwrap_or("").starts_with("12"),
            "{banner}"
        );
        let admin = read_trimmed(&data.join("admin.token")).unwrap();
        let o = v.ssh_password(&admin, &id, "debian pass", "echo by-password");
        assert_eq!(stdout(&o), "by-password\n", "{}", stderr(&o));
        assert!(!v.ssh_password(&admin, &id, "nope", "true").status.success());

        // scp (OpenSSH's internal sftp) in and back.
        let data_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let cfg = v.ssh_config("deb_ssh_config");
        let entry = format!("rivernode-vps-{id}");
        assert!(v.scp_round_trip(&cfg, &entry, "/root/payload", &data_bytes) == data_bytes);

        // Stop and restart: same disk, same host key, same logins.
        v.rn(&["vps", "stop", &id]);
        v.wait_state(&id, "stopped");
        v.rn(&["vps", "restart", &id]);
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["wc -c < /root/payload"]).trim(), "300000");
        v.delete(&id);
    });
}

/// A VPS made with `-e TZ=UTC -e TASKID=TEST -e "NOTE=two words"`: its SSH
/// sessions see those and the Vast.ai contract variables, and its
/// /etc/environment holds them.
/// `vps create` of busybox with `flags` fails, saying `why`.
fn refused(v: &Vps, flags: &[&str], why: &str) {
    let mut args = vec!["vps", "create", "--container", "busybox", "--no-ssh-key"];
    args.extend_from_slice(flags);
    let o = v.rn(&args);
    assert!(!o.status.success(), "{flags:?} was taken");
    assert!(stderr(&o).contains(why), "{flags:?}: {}", stderr(&o));
}

fn session_sees_the_instances_variables(v: &Vps, id: &str) {
    let seen = v.ssh_ok(
        id,
        &["echo \"$TZ|$TASKID|$NOTE|$CONTAINER_ID|$VAST_CONTAINERLABEL|$GPU_COUNT|$DATA_DIRECTORY|$RIVERNODE_CONTAINER_ID|$HOME\""],
    );
    assert_eq!(
        seen.trim(),
        format!("UTC|TEST|two words|{id}|C.{id}|0|/shared|{id}|/root"),
        "{seen}"
    );
    let key = v.ssh_ok(id, &["echo \"$SSH_PUBLIC_KEY\""]);
    assert!(key.starts_with("ssh-ed25519 "), "{key}");
    let etc = v.ssh_ok(id, &["cat", "/etc/environment"]);
    assert!(
        etc.lines().any(|l| l == "TZ=UTC") && etc.lines().any(|l| l == "NOTE=\"two words\""),
        "{etc}"
    );
    assert!(
        etc.lines().any(|l| l == format!("CONTAINER_ID={id}")),
        "{etc}"
    );
}

/// A UDP echo server for the busybox image (its nc has no UDP), built
/// static from this source by the machine's C compiler.
const UDP_ECHO: &str = r#"
#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) return 1;
    for (;;) {
        char buf[2048];
        struct sockaddr_in p;
        socklen_t l = sizeof p;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&p, &l);
        if (n > 0) sendto(s, buf, n, 0, (struct sockaddr *)&p, l);
    }
}
"#;

/// `vps ports`'s lines, `HOST:EXT -> INTERNAL/PROTO`, as (ext, "internal/proto").
fn published(v: &Vps, id: &str) -> Vec<(u16, String)> {
    let o = v.rn(&["vps", "ports", id]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .lines()
        .filter_map(|l| {
            let (outside, inside) = l.split_once(" -> ")?;
            let ext = outside.rsplit_once(':')?.1.parse().ok()?;
            Some((ext, inside.to_string()))
        })
        .collect()
}

fn http_get(port: u16) -> Option<String> {
    let o = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .ok()?;
    o.status.success().then(|| stdout(&o))
}

fn udp_echo(port: u16, text: &str) -> Option<String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .ok()?;
    s.send_to(text.as_bytes(), ("127.0.0.1", port)).ok()?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

#[test]
fn published_ports_reach_the_instance_through_the_host() {
    if !parts_present() {
        return;
    }
    let present = command_exists("cc") && command_exists("curl");
    if !real_part_available("a C compiler (gcc) and curl", present) {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("ports") else { return };
        // The admin's part of the cluster share is /shared in the instance.
        let tools = v.dir.path().join("shared/admin");
        std::fs::create_dir_all(&tools).unwrap();
        std::fs::write(tools.join("udp-echo.c"), UDP_ECHO).unwrap();
        let built = std::process::Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(tools.join("udp-echo"))
            .arg(tools.join("udp-echo.c"))
            .status()
            .unwrap();
        assert!(built.success(), "cc -static failed (libc6-dev has libc.a)");
        // The web servers serve their own port's number; the identity port
        // listens on its external port, which only the variable tells.
        let onstart = "mkdir -p /www/a /www/b && echo served-8081 > /www/a/index.html \
             && echo served-identity > /www/b/index.html \
             && httpd -p 8081 -h /www/a && httpd -p $VAST_TCP_PORT_70000 -h /www/b \
             && (/shared/udp-echo 8082 &)";
        // More than 64 is refused, naming the limit, and nothing is made.
        let asks: Vec<String> = (9000..9065).map(|p| p.to_string()).collect();
        let many: Vec<&str> = asks.iter().flat_map(|a| ["-p", a.as_str()]).collect();
        refused(&v, &many, "at most 64");
        refused(&v, &["-p", "8080:80"], "-p 80");
        // Our SSH server is reached through the proxy, with a token, never published.
        refused(&v, &["-p", "22"], "22 is the VPS's SSH server");

        let id = v.create_with(&[
            "-p",
            "8081:8081",
            "-p",
            "8082:8082/udp",
            "-p",
            "70000:70000",
            "--onstart-cmd",
            onstart,
        ]);
        let ports = published(&v, &id);
        assert_eq!(ports.len(), 3, "{ports:?}");
        let ext = |inside: &str| {
            ports
                .iter()
                .find(|(_, i)| i == inside)
                .unwrap_or_else(|| panic!("no {inside} in {ports:?}"))
                .0
        };
        let (tcp, udp) = (ext("8081/tcp"), ext("8082/udp"));
        let identity = ports
            .iter()
            .find(|(e, i)| *i == format!("{e}/tcp"))
            .expect("the identity port is the same number inside")
            .0;
        assert!([tcp, udp, identity]
            .iter()
            .all(|p| (20000..30000).contains(p)));
        // The instance's variables name the same external ports.
        let seen = v.ssh_ok(
            &id,
            &["echo $VAST_TCP_PORT_8081 $VAST_UDP_PORT_8082 $VAST_TCP_PORT_70000 $RIVERNODE_TCP_PORT_8081"],
        );
        assert_eq!(seen, format!("{tcp} {udp} {identity} {tcp}\n"));
        // curl at the host's address reaches the servers inside; UDP echoes.
        let got = wait_for("the web server on 8081", || http_get(tcp));
        assert_eq!(got, "served-8081\n");
        let got = wait_for("the identity port's server", || http_get(identity));
        assert_eq!(got, "served-identity\n");
        let got = wait_for("the UDP echo", || udp_echo(udp, "ping over udp"));
        assert_eq!(got, "ping over udp");

        // Stopped: the doors close; restarted: the same ports open again.
        let o = v.rn(&["vps", "stop", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "stopped");
        wait_for("the published port to close", || {
            http_get(tcp).is_none().then_some(())
        });
        let o = v.rn(&["vps", "restart", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        assert_eq!(published(&v, &id), ports, "a VPS keeps its ports");
        let got = wait_for("the web server after the restart", || http_get(tcp));
        assert_eq!(got, "served-8081\n");

        // An image's EXPOSE is published without -p, beside what -p asks.
        let build = v.dir.path().join("exp-build");
        std::fs::create_dir_all(&build).unwrap();
        let Some(archive) = common::containerd::busybox_oci_archive_with(
            &build,
            None,
            &[
                "--config.exposedports",
                "8083/tcp",
                "--config.exposedports",
                "8081/tcp",
            ],
            &[],
            &[],
        ) else {
            return;
        };
        std::fs::copy(&archive, v.dir.path().join("shared/environments/exp.tar")).unwrap();
        let exp = v.create_from(
            "exp",
            &[
                "-p",
                "8081",
                "--onstart-cmd",
                "mkdir -p /www && echo exposed > /www/index.html && httpd -p 8083 -h /www",
            ],
        );
        let ports = published(&v, &exp);
        let mut inside: Vec<&str> = ports.iter().map(|(_, i)| i.as_str()).collect();
        inside.sort();
        assert_eq!(inside, ["8081/tcp", "8083/tcp"], "{ports:?}");
        let ext = ports.iter().find(|(_, i)| i == "8083/tcp").unwrap().0;
        let seen = v.ssh_ok(&exp, &["echo $VAST_TCP_PORT_8083"]);
        assert_eq!(seen, format!("{ext}\n"));
        let got = wait_for("the EXPOSEd port", || http_get(ext));
        assert_eq!(got, "exposed\n");
        v.delete(&exp);

        // Deleted: its ports go, and the node's rules with them.
        v.delete(&id);
        wait_for("the published port to close", || {
            http_get(tcp).is_none().then_some(())
        });
        let rules = std::process::Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        assert!(!stdout(&rules).contains("dnat ip to"), "{}", stdout(&rules));
    });
}

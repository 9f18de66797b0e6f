//! Network-namespace labs for the DHCP tests and benchmark: named network
//! namespaces joined by a veth pair (two nodes) or by a bridge in a switch
//! namespace (more nodes). Everything is deleted on drop, also when a test
//! fails. Needs root and `ip` (iproute2). Not used by the appliance at run
//! time.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS…`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {} (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `adl-<pid>-<n>-<tag>` with `lo` up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("adl-{}-{n}-{tag}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into the namespace (sockets it opens
    /// afterwards live there).
    pub fn enter(&self) -> anyhow::Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let f = File::open(&path).with_context(|| format!("opening {path}"))?;
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering network namespace {}", self.name))
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            let ns = Netns { name };
            let r = ns.enter();
            std::mem::forget(ns); // not ours to delete
            r?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// One host in a lab: its namespace and its interface name.
#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    pub iface: String,
}

/// Hosts on one Ethernet segment.
#[derive(Debug)]
pub struct Lab {
    pub nodes: Vec<Node>,
    switch: Option<Netns>,
}

/// How to set up one node: a short name, an optional `addr/prefix` and an
/// optional MAC address.
pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub addr: Option<&'a str>,
    pub mac: Option<&'a str>,
}

impl Lab {
    /// Two nodes on a veth pair, or more on a bridge.
    pub fn new(specs: &[NodeSpec<'_>]) -> anyhow::Result<Self> {
        anyhow::ensure!(specs.len() >= 2, "a lab needs at least two nodes");
        let mut lab = Lab {
            nodes: Vec::new(),
            switch: None,
        };
        for s in specs {
            lab.nodes.push(Node {
                ns: Netns::new(s.name)?,
                iface: format!("v-{}", s.name),
            });
        }
        if specs.len() == 2 {
            let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
            ip(&[
                "link", "add", &a.iface, "netns", &a.ns.name, "type", "veth", "peer", "name",
                &b.iface, "netns", &b.ns.name,
            ])?;
        } else {
            let sw = Netns::new("sw")?;
            sw.ip(&["link", "add", "br0", "type", "bridge", "forward_delay", "0"])?;
            sw.ip(&["link", "set", "br0", "up"])?;
            for (i, n) in lab.nodes.iter().enumerate() {
                let port = format!("p{i}");
                ip(&[
                    "link", "add", &n.iface, "netns", &n.ns.name, "type", "veth", "peer", "name",
                    &port, "netns", &sw.name,
                ])?;
                sw.ip(&["link", "set", &port, "master", "br0", "up"])?;
            }
            lab.switch = Some(sw);
        }
        for (n, s) in lab.nodes.iter().zip(specs) {
            if let Some(mac) = s.mac {
                n.ns.ip(&["link", "set", &n.iface, "address", mac])?;
            }
            if let Some(addr) = s.addr {
                n.ns.ip(&["addr", "add", addr, "dev", &n.iface])?;
            }
            n.ns.ip(&["link", "set", &n.iface, "up"])?;
        }
        Ok(lab)
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails with a clear message when `program` cannot be run.
pub fn require_tool(program: &str, args: &[&str]) -> anyhow::Result<()> {
    match Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => bail!("{program} is needed for this test and cannot be run ({e}); install it (xtask/debian-packages.txt)"),
    }
}

//! The dependency closure of a partial mirror, by name and version.
//!
//! Unlike [`bundle::debian::resolve`] (one suite, names only), a mirror's
//! index may hold several versions of a name (`bookworm` and
//! `bookworm-updates`, or an archive keeping old versions), so a
//! versioned dependency (`libc6 (>= 2.36)`) picks the newest version that
//! satisfies it, and the closure is a set of `(name, version)`. Followed:
//! `Pre-Depends`, `Depends`, alternatives (`a | b`: one already chosen
//! that satisfies it, else the first that can be satisfied), virtual
//! packages (`Provides`, first provider by name), and with `recommends`
//! the `Recommends` (skipped when nothing satisfies them, as apt does).
//! A dependency nothing satisfies is an error naming the package that
//! needs it and what it needs.
//!
//! Two rules share this walk ([`Rule`]): the installer's ([`resolve`]:
//! one choice per group, what the appliance's own installer unpacks) and
//! the mirror's ([`resolve_for_mirror`]): besides that choice, each
//! group of alternatives also keeps its first alternative that can be
//! met, and that one's closure, because the mirror serves upstream's
//! whole index and stock apt on a root holding none of a group's
//! alternatives takes the first (`usrmerge | usr-is-merged` takes
//! `usrmerge`, though the required `usr-is-merged` meets the group for
//! our installer).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{bail, Result};
use bundle::debian::{compare_versions, Dep, Package};

/// `Recommends` of each `(name, version)` in an index (the parsed
/// [`Package`] does not carry them).
pub type Recommends = HashMap<(String, String), Vec<Vec<Dep>>>;

/// Reads the `Recommends` field of every stanza of a `Packages` text.
pub fn parse_recommends(text: &str) -> Recommends {
    let mut out = Recommends::new();
    for stanza in text.split("\n\n") {
        let (mut name, mut version, mut rec) = (None, None, None);
        let mut field: Option<&str> = None;
        let mut rec_text = String::new();
        for line in stanza.lines() {
            if line.starts_with([' ', '\t']) {
                if field == Some("Recommends") {
                    rec_text.push(' ');
                    rec_text.push_str(line.trim());
                }
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            field = Some(k);
            match k {
                "Package" => name = Some(v.trim().to_owned()),
                "Version" => version = Some(v.trim().to_owned()),
                "Recommends" => {
                    rec_text = v.trim().to_owned();
                    rec = Some(());
                }
                _ => {}
            }
        }
        if let (Some(n), Some(v), Some(())) = (name, version, rec) {
            out.insert((n, v), bundle::debian::parse_deps(&rec_text));
        }
    }
    out
}

/// Whether `version` satisfies a constraint as written (`>= 1.2`).
pub fn satisfies(version: &str, constraint: Option<&str>) -> bool {
    let Some(c) = constraint.map(str::trim).filter(|c| !c.is_empty()) else {
        return true;
    };
    let (op, want) = match c.find(|ch: char| !matches!(ch, '<' | '>' | '=')) {
        Some(i) => (&c[..i], c[i..].trim()),
        None => return false,
    };
    let ord = compare_versions(version, want);
    match op {
        ">=" | ">" => ord.is_ge(),
        "<=" | "<" => ord.is_le(),
        ">>" => ord.is_gt(),
        "<<" => ord.is_lt(),
        "=" => ord.is_eq(),
        _ => false,
    }
}

/// The closure of `roots` (`(name, why it is wanted)`; each root's newest
/// version) over `index`. A dependency already met by a package chosen or
/// waiting to be (by name and version, or unversioned by what it
/// provides) adds nothing: `base-files`' `awk` is `mawk`, a required
/// root, not the first provider by name.
pub fn resolve(
    index: &[Package],
    recommends: Option<&Recommends>,
    roots: &[(String, String)],
) -> Result<BTreeSet<(String, String)>> {
    resolve_with(index, recommends, roots, Rule::Installer)
}

/// What a mirror must hold for `roots`: [`resolve`]'s closure plus, for
/// every group of two or more alternatives met on the way, the first
/// alternative that can be met (by name and version, else unversioned by
/// its first provider by name) and its closure, so stock apt finds every
/// pool file it picks on an empty root. A superset of [`resolve`].
pub fn resolve_for_mirror(
    index: &[Package],
    recommends: Option<&Recommends>,
    roots: &[(String, String)],
) -> Result<BTreeSet<(String, String)>> {
    resolve_with(index, recommends, roots, Rule::Mirror)
}

/// Which packages a group of alternatives adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// One choice per group: nothing when something chosen meets it.
    Installer,
    /// That choice, and also the group's first alternative that can be
    /// met (stock apt's pick on an empty root).
    Mirror,
}

/// [`resolve`] or [`resolve_for_mirror`], by `rule`.
pub fn resolve_with(
    index: &[Package],
    recommends: Option<&Recommends>,
    roots: &[(String, String)],
    rule: Rule,
) -> Result<BTreeSet<(String, String)>> {
    let mut by_name: HashMap<&str, Vec<&Package>> = HashMap::new();
    let mut providers: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for p in index {
        by_name.entry(&p.name).or_default().push(p);
        for v in &p.provides {
            providers.entry(v).or_default().insert(&p.name);
        }
    }
    for v in by_name.values_mut() {
        // Newest first.
        v.sort_by(|a, b| compare_versions(&b.version, &a.version));
    }
    // Newest version of `name` satisfying `constraint`.
    let best = |name: &str, constraint: Option<&str>| -> Option<&Package> {
        by_name
            .get(name)?
            .iter()
            .copied()
            .find(|p| satisfies(&p.version, constraint))
    };
    let mut chosen: BTreeMap<(String, String), &Package> = BTreeMap::new();
    // Name → versions chosen; virtual name → providers chosen.
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    let mut provided: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<&Package> = Vec::new();
    for (name, why) in roots {
        match best(name, None) {
            Some(p) => queue.push(p),
            None => bail!("package {name} ({why}) is not in the mirror's index"),
        }
    }
    // A name that is also a real package is met only by it: apt installing
    // onto an empty system takes the real `lsb-base`, not
    // `sysvinit-utils` that provides it.
    let virtual_only = |name: &str| !by_name.contains_key(name);
    let is_satisfied = |d: &Dep,
                        names: &HashMap<String, Vec<String>>,
                        provided: &BTreeSet<String>,
                        queue: &[&Package]| {
        names
            .get(&d.name)
            .is_some_and(|vs| vs.iter().any(|v| satisfies(v, d.constraint.as_deref())))
            || (virtual_only(&d.name) && d.constraint.is_none() && provided.contains(&d.name))
            || queue.iter().any(|q| {
                (q.name == d.name && satisfies(&q.version, d.constraint.as_deref()))
                    || (virtual_only(&d.name)
                        && d.constraint.is_none()
                        && q.provides.contains(&d.name))
            })
    };
    let mut i = 0;
    while i < queue.len() {
        let p = queue[i];
        i += 1;
        let key = (p.name.clone(), p.version.clone());
        if chosen.contains_key(&key) {
            continue;
        }
        chosen.insert(key.clone(), p);
        names
            .entry(p.name.clone())
            .or_default()
            .push(p.version.clone());
        provided.extend(p.provides.iter().cloned());
        let rec = recommends.and_then(|r| r.get(&key));
        let groups = p
            .pre_depends
            .iter()
            .map(|g| (g, true))
            .chain(p.depends.iter().map(|g| (g, true)))
            .chain(rec.into_iter().flatten().map(|g| (g, false)));
        for (group, hard) in groups {
            if rule == Rule::Mirror && group.len() > 1 {
                // Apt's pick on a root holding none of the alternatives:
                // the first one it can install.
                let first = group.iter().find_map(|d| {
                    best(&d.name, d.constraint.as_deref()).or_else(|| {
                        if d.constraint.is_some() || !virtual_only(&d.name) {
                            return None;
                        }
                        providers
                            .get(d.name.as_str())
                            .and_then(|s| s.iter().next())
                            .and_then(|n| best(n, None))
                    })
                });
                if let Some(q) = first {
                    let key = (q.name.clone(), q.version.clone());
                    if !chosen.contains_key(&key) && !queue[i..].iter().any(|x| std::ptr::eq(*x, q))
                    {
                        queue.push(q);
                    }
                }
            }
            if group
                .iter()
                .any(|d| is_satisfied(d, &names, &provided, &queue[i..]))
            {
                continue;
            }
            let pick = group
                .iter()
                .find_map(|d| best(&d.name, d.constraint.as_deref()))
                .or_else(|| {
                    group.iter().find_map(|d| {
                        // A versioned dependency is not met by a provider
                        // (its Provides carry no version here).
                        if d.constraint.is_some() {
                            return None;
                        }
                        providers
                            .get(d.name.as_str())
                            .and_then(|s| s.iter().next())
                            .and_then(|n| best(n, None))
                    })
                });
            match pick {
                Some(q) => queue.push(q),
                None if !hard => {}
                None => {
                    let want: Vec<String> = group
                        .iter()
                        .map(|d| match &d.constraint {
                            Some(c) => format!("{} ({c})", d.name),
                            None => d.name.clone(),
                        })
                        .collect();
                    let have: Vec<String> = group
                        .iter()
                        .flat_map(|d| by_name.get(d.name.as_str()).into_iter().flatten())
                        .map(|q| format!("{} {}", q.name, q.version))
                        .collect();
                    bail!(
                        "package {} {} needs {}, which no package in the mirror's index satisfies{}",
                        p.name,
                        p.version,
                        want.join(" | "),
                        if have.is_empty() {
                            String::new()
                        } else {
                            format!(" (the index has {})", have.join(", "))
                        }
                    );
                }
            }
        }
    }
    Ok(chosen.into_keys().collect())
}

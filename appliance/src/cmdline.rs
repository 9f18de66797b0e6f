//! Kernel command line: extracts the `appliance.*` parameters.
//!
//! Only splitting lives here; the meaning of each key is in
//! [`crate::config`], shared with the fw_cfg and ESP JSON sources.

/// Prefix of the parameters this appliance reads.
pub const PREFIX: &str = "appliance.";

/// Splits a kernel command line into words, honouring double quotes the way
/// the kernel does (`a="b c"` is one word `a=b c`).
pub fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut have = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                have = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if have {
                    words.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        words.push(cur);
    }
    words
}

/// Returns the `appliance.*` parameters as `(key, value)` pairs in order,
/// with the prefix removed; a bare `appliance.flag` has an empty value.
pub fn appliance_params(cmdline: &str) -> Vec<(String, String)> {
    split_words(cmdline)
        .into_iter()
        .filter_map(|w| {
            let rest = w.strip_prefix(PREFIX)?;
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_appliance_params_and_ignores_others() {
        let params = appliance_params(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 appliance.mode=agent quiet \
             appliance.ip=10.0.0.5/24,10.0.0.1 appliance.debug\n",
        );
        assert_eq!(
            params,
            vec![
                ("mode".to_owned(), "agent".to_owned()),
                ("ip".to_owned(), "10.0.0.5/24,10.0.0.1".to_owned()),
                ("debug".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn quotes_keep_spaces_together() {
        assert_eq!(
            appliance_params(r#"appliance.log="info,appliance=debug x" ro"#),
            vec![("log".to_owned(), "info,appliance=debug x".to_owned())]
        );
        assert_eq!(split_words("  a  \"\" b "), vec!["a", "", "b"]);
    }
}

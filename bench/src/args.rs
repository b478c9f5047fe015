//! A small `--key value` option parser: the bench has many modes with a few
//! numeric knobs each, and an unknown or misspelt option must fail loudly
//! rather than silently run a different workload.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use anyhow::{Context, Result, bail};

pub struct Options {
    values: BTreeMap<String, String>,
    used: RefCell<BTreeSet<String>>,
}

impl Options {
    /// Parses `--key value` pairs (and `--key=value`).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self> {
        let mut values = BTreeMap::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let Some(key) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?}");
            };
            let (key, value) = match key.split_once('=') {
                Some((key, value)) => (key.to_owned(), value.to_owned()),
                None => {
                    let value = args
                        .next()
                        .with_context(|| format!("--{key} needs a value"))?;
                    (key.to_owned(), value)
                }
            };
            values.insert(key, value);
        }
        Ok(Self {
            values,
            used: RefCell::default(),
        })
    }

    /// The value of `--key`, if given.
    pub fn optional(&self, key: &str) -> Option<&str> {
        self.used.borrow_mut().insert(key.to_owned());
        self.values.get(key).map(String::as_str)
    }

    /// The value of `--key`, which must be given.
    pub fn required(&self, key: &str) -> Result<&str> {
        self.optional(key)
            .with_context(|| format!("--{key} is required"))
    }

    /// The value of `--key` parsed as `T`, or `default`.
    pub fn number<T: FromStr>(&self, key: &str, default: T) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.optional(key) {
            Some(value) => value
                .parse()
                .with_context(|| format!("bad --{key} {value:?}")),
            None => Ok(default),
        }
    }

    /// Fails on any option that no `optional`/`required`/`number` asked for.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let unknown: Vec<&String> = self.values.keys().filter(|k| !used.contains(*k)).collect();
        if !unknown.is_empty() {
            bail!("unknown option(s): {unknown:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options> {
        Options::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn reads_values_defaults_and_rejects_unknown_options() -> Result<()> {
        let opts = parse(&["--calls", "10", "--address=unix:path=/x", "--typo", "1"])?;
        assert_eq!(opts.number("calls", 5u32)?, 10);
        assert_eq!(opts.number("size", 8usize)?, 8);
        assert_eq!(opts.required("address")?, "unix:path=/x");
        assert!(opts.required("dest").is_err());
        assert!(opts.finish().is_err());
        assert!(opts.number::<u32>("address", 0).is_err());
        Ok(())
    }

    #[test]
    fn rejects_positional_and_missing_values() {
        assert!(parse(&["stray"]).is_err());
        assert!(parse(&["--calls"]).is_err());
    }
}

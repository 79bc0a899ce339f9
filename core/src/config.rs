//! Layered configuration: file → environment (`FERRY_…`) → flags.
//!
//! The environment is passed in as a map ([`Env`]) rather than read globally, so tests
//! inject what they want. Each component's config struct implements serde defaults
//! (the file layer) and applies [`Env`] and its flags on top.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, ErrorCode};

/// A snapshot of environment variables.
#[derive(Clone, Debug, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// The process environment; call it once, in `main`.
    pub fn from_process() -> Self {
        Self(std::env::vars().collect())
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Parses `key` when set; a value that does not parse is an error naming the key.
    pub fn parse<T: FromStr>(&self, key: &str) -> Result<Option<T>, Error>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| Error::new(ErrorCode::BadRequest, format!("{key}={v:?}: {e}")))
            })
            .transpose()
    }
}

/// Reads a TOML config file into `T` (unknown keys are errors, so typos show).
pub fn load_file<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, Error> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorCode::BadRequest,
            format!("read config {}: {e}", path.display()),
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        Error::new(
            ErrorCode::BadRequest,
            format!("config {}: {}", path.display(), e.message()),
        )
    })
}

/// Sets `slot` from the first layer that has a value: flag, then environment.
pub fn layer<T: FromStr>(slot: &mut T, env: &Env, key: &str, flag: Option<T>) -> Result<(), Error>
where
    T::Err: std::fmt::Display,
{
    if let Some(v) = flag {
        *slot = v;
    } else if let Some(v) = env.parse::<T>(key)? {
        *slot = v;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_env_beat_file() {
        let env = Env::from_pairs([("FERRY_LISTEN", "127.0.0.1:9000"), ("FERRY_BAD", "x")]);
        let mut listen = "file".to_string();
        layer(&mut listen, &env, "FERRY_LISTEN", None).unwrap();
        assert_eq!(listen, "127.0.0.1:9000");
        layer(&mut listen, &env, "FERRY_LISTEN", Some("flag".into())).unwrap();
        assert_eq!(listen, "flag");
        let mut n = 1u32;
        let err = layer(&mut n, &env, "FERRY_BAD", None).unwrap_err();
        assert!(err.message.contains("FERRY_BAD"));
        layer(&mut n, &env, "FERRY_UNSET", None).unwrap();
        assert_eq!(n, 1);
    }
}

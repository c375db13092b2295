//! Loading the configuration: the compiled defaults, then the `--config` file, then the
//! `--profile`, then `SHARDMQ_*` environment variables, each layer over the one before.
//!
//! Every error is one line that says where the offending value came from (the file's path as
//! the user gave it, the profile, or the environment variable's name): an unknown key with the
//! closest known one, a value that does not parse or is not usable with its key, a TOML syntax
//! error with its line and column. `SHARDMQ_CONFIG` and `SHARDMQ_PROFILE` stand for `--config`
//! and `--profile`; other `SHARDMQ_*` variables without `__` are not keys and are reported as
//! ignored. Checking the host (CPUs) is not part of loading: a profile for another machine can
//! be printed anywhere ([`Config::check_host`] belongs to the start and to `--check`).

use super::{Config, ConfigError, BUILTIN_PROFILES};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use std::path::PathBuf;

/// The prefix of the environment variables that set keys.
pub const ENV_PREFIX: &str = "SHARDMQ_";

/// Where [`load`] looks.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--config FILE`.
    pub config_file: Option<PathBuf>,
    /// `--profile NAME`.
    pub profile: Option<String>,
    /// Directory of profiles; `configs/profiles` when not given.
    pub profiles_dir: Option<PathBuf>,
    /// Whether `SHARDMQ_*` environment variables are read.
    pub use_env: bool,
}

/// A loaded configuration, and what was ignored on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration, validated (not yet checked against this host).
    pub config: Config,
    /// One line per thing ignored (a `SHARDMQ_*` variable that is not a key).
    pub warnings: Vec<String>,
    /// The layers, to say where a value came from.
    layers: Figment,
}

impl Loaded {
    /// [`Config::check_host`], its errors saying where the value came from.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        self.config
            .check_host()
            .map_err(|e| with_origin(&self.layers, e))
    }
}

/// An `Invalid` error with the origin of its key filled in.
fn with_origin(fig: &Figment, e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Invalid {
            key,
            reason,
            origin: o,
        } if o.is_empty() => {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            let from = origin(fig.find_metadata(&key), &path)
                .map(|o| format!(" (from {o})"))
                .unwrap_or_default();
            ConfigError::Invalid {
                key,
                reason,
                origin: from,
            }
        }
        other => other,
    }
}

/// A provider whose values are labelled with where they came from.
struct Labeled<P> {
    inner: P,
    label: String,
}

impl<P: Provider> Provider for Labeled<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.label.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// The label of the environment layer (each key's variable is named in errors).
const ENV_LABEL: &str = "environment";

/// Reads a TOML file or text, refusing bad syntax in one line (`label:line:column: …`).
fn toml_layer(
    label: &str,
    text: &str,
    shown: &str,
) -> Result<Labeled<figment::providers::Data<Toml>>, ConfigError> {
    if let Err(e) = text.parse::<toml::Table>() {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
        return Err(ConfigError::Syntax {
            file: shown.to_string(),
            line,
            column,
            message: e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(Labeled {
        inner: Toml::string(text),
        label: label.to_string(),
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Loads, merges and validates the configuration.
pub fn load(opts: &LoadOptions) -> Result<Loaded, ConfigError> {
    let mut warnings = Vec::new();
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    let env_path = |name: &str| {
        opts.use_env
            .then(|| std::env::var_os(format!("{ENV_PREFIX}{name}")))
            .flatten()
            .filter(|v| !v.is_empty())
    };
    let config_file = opts
        .config_file
        .clone()
        .or_else(|| env_path("CONFIG").map(PathBuf::from));
    if let Some(path) = &config_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File(path.clone(), e.to_string()))?;
        let shown = path.display().to_string();
        fig = fig.merge(toml_layer(&format!("config file {shown}"), &text, &shown)?);
    }
    let profile = opts
        .profile
        .clone()
        .or_else(|| env_path("PROFILE").map(|p| p.to_string_lossy().into_owned()));
    if let Some(name) = &profile {
        let dir = opts
            .profiles_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("configs/profiles"));
        let path = dir.join(format!("{name}.toml"));
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::File(path.clone(), e.to_string()))?;
            let shown = path.display().to_string();
            fig = fig.merge(toml_layer(
                &format!("profile {name} ({shown})"),
                &text,
                &shown,
            )?);
        } else if let Some((_, text)) = BUILTIN_PROFILES.iter().find(|(n, _)| n == name) {
            let label = format!("built-in profile {name}");
            fig = fig.merge(toml_layer(&label, text, &label)?);
        } else {
            return Err(ConfigError::UnknownProfile(name.clone(), path));
        }
    }
    if opts.use_env {
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if let Some(rest) = k.strip_prefix(ENV_PREFIX) {
                if !rest.contains("__") && rest != "CONFIG" && rest != "PROFILE" {
                    warnings.push(format!(
                        "ignoring environment variable {k}: not a configuration key (keys are {ENV_PREFIX}<SECTION>__<KEY>, such as {ENV_PREFIX}MQTT__MAX_INFLIGHT)"
                    ));
                }
            }
        }
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|k| k.as_str().contains("__"))
            .split("__");
        fig = fig.merge(Labeled {
            inner: env,
            label: ENV_LABEL.into(),
        });
    }
    let config = from_figment(&fig)?;
    Ok(Loaded {
        config,
        warnings,
        layers: fig,
    })
}

/// Parses one TOML document on top of the compiled defaults (used by tests and tools).
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    let fig = Figment::from(Serialized::defaults(Config::default())).merge(toml_layer(
        "TOML text",
        text,
        "TOML text",
    )?);
    from_figment(&fig)
}

/// Where the value at `path` came from, as errors say it: `config file x.toml`,
/// `environment variable SHARDMQ_MQTT__MAX_INFLIGHT`; `None` for the defaults.
fn origin(meta: Option<&Metadata>, path: &[String]) -> Option<String> {
    let name = meta?.name.as_ref();
    if name == ENV_LABEL {
        return Some(format!("environment variable {}", env_var(path)));
    }
    (name.starts_with("config file")
        || name.starts_with("profile")
        || name.starts_with("built-in profile")
        || name == "TOML text")
        .then(|| name.to_string())
}

/// The environment variable that sets the key at `path`.
pub fn env_var(path: &[String]) -> String {
    let keys: Vec<String> = path.iter().map(|k| k.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", keys.join("__"))
}

/// Rust type names in serde's messages, in words (`expected usize` → `expected an integer`).
fn plain_types(s: &str) -> String {
    let mut out = s.to_string();
    for (rust, words) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        if let Some(rest) = out.strip_suffix(rust) {
            out = format!("{rest}{words}");
        }
    }
    out
}

/// The known name closest to `unknown`, if one is close enough to be a typo of it.
fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn from_figment(fig: &Figment) -> Result<Config, ConfigError> {
    let cfg: Config = fig.extract().map_err(|e| {
        let mut errors: Vec<ConfigError> = e.into_iter().map(|e| describe(&e)).collect();
        if errors.len() == 1 {
            errors.remove(0)
        } else {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ConfigError::Figment(lines.join("; "))
        }
    })?;
    cfg.validate().map_err(|e| with_origin(fig, e))?;
    Ok(cfg)
}

/// One extraction error as a line.
fn describe(e: &figment::Error) -> ConfigError {
    use figment::error::Kind;
    let from = origin(e.metadata.as_ref(), &e.path);
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            // The path ends with the unknown field (figment adds it).
            let mut parent = e.path.clone();
            if parent.last() == Some(field) {
                parent.pop();
            }
            let mut path = parent.clone();
            path.push(field.clone());
            let key = path.join(".");
            let hint = closest(field, expected)
                .map(|k| {
                    let mut known = parent.clone();
                    known.push(k.to_string());
                    let name = known.join(".");
                    if from
                        .as_deref()
                        .is_some_and(|o| o.starts_with("environment"))
                    {
                        format!("; did you mean `{name}` ({})?", env_var(&known))
                    } else {
                        format!("; did you mean `{name}`?")
                    }
                })
                .unwrap_or_default();
            ConfigError::UnknownKey {
                key,
                origin: from.map(|o| format!(" (from {o})")).unwrap_or_default(),
                hint,
            }
        }
        kind => {
            let key = e.path.join(".");
            let reason = match kind {
                Kind::Message(m) => m.clone(),
                k => plain_types(&k.to_string()),
            };
            ConfigError::Invalid {
                key,
                reason,
                origin: from.map(|o| format!(" (from {o})")).unwrap_or_default(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        assert_eq!(line_col("a = 1\nb = ?\n", 10), (2, 5));
        assert_eq!(line_col("x", 0), (1, 1));
    }

    #[test]
    fn typos_find_their_key_and_strangers_do_not() {
        let known = ["max_inflight", "max_packet_size", "idle_timeout"];
        assert_eq!(closest("max_infligt", &known), Some("max_inflight"));
        assert_eq!(closest("max_inflihgt", &known), Some("max_inflight"));
        assert_eq!(closest("colour", &known), None);
        assert_eq!(
            env_var(&["mqtt".into(), "max_inflight".into()]),
            "SHARDMQ_MQTT__MAX_INFLIGHT"
        );
    }
}

//! Where the weights come from (`demo`, `hub:<repo>[@rev]`, `dir:<path>`) and how a file of the
//! model layout is found in each.
//!
//! Every source resolves to the Black Forest Labs / diffusers repo layout, so one loader serves
//! all three: `flux1-{schnell,dev}.safetensors`, `ae.safetensors`, `text_encoder/` (CLIP-L),
//! `text_encoder_2/` (T5-XXL), `tokenizer/` and `tokenizer_2/`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::demo;
use super::error::LoadError;

/// A configured weight source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ModelSource {
    /// Tiny seeded weights written under the data dir on first use.
    Demo,
    /// A Hugging Face Hub repo, optionally at a revision (branch, tag or commit).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `main` when absent.
        revision: Option<String>,
    },
    /// A local folder in the hub layout.
    Dir(PathBuf),
}

impl FromStr for ModelSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "demo" {
            return Ok(ModelSource::Demo);
        }
        if let Some(rest) = s.strip_prefix("hub:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
                Some(_) => return Err(format!("`{s}`: empty revision after `@`")),
                None => (rest, None),
            };
            let valid = repo.split('/').count() == 2
                && repo.split('/').all(|p| {
                    !p.is_empty()
                        && p != "."
                        && p != ".."
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                });
            if !valid {
                return Err(format!(
                    "`{s}`: a hub source is `hub:owner/name[@revision]`, e.g. hub:black-forest-labs/FLUX.1-schnell"
                ));
            }
            return Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision,
            });
        }
        if let Some(path) = s.strip_prefix("dir:") {
            if path.is_empty() {
                return Err(format!("`{s}`: `dir:` needs a folder path"));
            }
            return Ok(ModelSource::Dir(PathBuf::from(path)));
        }
        Err(format!(
            "unknown model source `{s}` (expected `demo`, `hub:<repo>[@rev]` or `dir:<path>`)"
        ))
    }
}

impl TryFrom<String> for ModelSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map_err(|e| format!("model.source: {e}"))
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Demo => f.write_str("demo"),
            ModelSource::Hub {
                repo,
                revision: None,
            } => write!(f, "hub:{repo}"),
            ModelSource::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "hub:{repo}@{r}"),
            ModelSource::Dir(p) => write!(f, "dir:{}", p.display()),
        }
    }
}

impl From<ModelSource> for String {
    fn from(s: ModelSource) -> Self {
        s.to_string()
    }
}

/// Files of one model, found locally or fetched from the hub on demand.
pub enum ModelFiles {
    /// A folder on disk (also what the demo source becomes).
    Dir(PathBuf),
    /// A hub repo; files download into the HF cache on first `get`.
    Hub(Box<HubFiles>),
}

/// A hub repo with its file listing, fetched once.
pub struct HubFiles {
    label: String,
    runtime: tokio::runtime::Runtime,
    repo: hf_hub::api::tokio::ApiRepo,
    listing: BTreeSet<String>,
}

fn hub_error(label: &str, file: &str, e: hf_hub::api::tokio::ApiError) -> LoadError {
    use hf_hub::api::tokio::ApiError;
    let (reason, transient) = match &e {
        ApiError::RequestError(re) => match re.status() {
            Some(s) if s.as_u16() == 401 || s.as_u16() == 403 => (
                format!(
                    "{e} (gated or private repo: accept its licence on huggingface.co and set HF_TOKEN)"
                ),
                false,
            ),
            Some(s) if s.as_u16() == 404 => {
                (format!("{e} (no such repo, revision or file)"), false)
            }
            Some(s) => (e.to_string(), s.is_server_error() || s.as_u16() == 429),
            None => (e.to_string(), true),
        },
        ApiError::IoError(_) | ApiError::TooManyRetries(_) => (e.to_string(), true),
        _ => (e.to_string(), false),
    };
    LoadError::Download {
        repo: label.to_string(),
        file: file.to_string(),
        reason,
        transient,
    }
}

impl HubFiles {
    /// Connects to the hub (HF_TOKEN, HF_HOME, HF_ENDPOINT honoured) and lists the repo.
    ///
    /// Blocks on its own small runtime: call it from a plain thread, never from async code.
    pub fn open(repo: &str, revision: Option<&str>) -> Result<Self, LoadError> {
        let label = match revision {
            Some(r) => format!("{repo}@{r}"),
            None => repo.to_string(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| LoadError::Io {
                file: PathBuf::from("(tokio runtime for hub downloads)"),
                source,
            })?;
        let mut builder = hf_hub::api::tokio::ApiBuilder::from_env().with_progress(true);
        if let Ok(token) = std::env::var("HF_TOKEN")
            && !token.trim().is_empty()
        {
            builder = builder.with_token(Some(token.trim().to_string()));
        }
        let api = builder
            .build()
            .map_err(|e| hub_error(&label, "(client)", e))?;
        let repo_ref = hf_hub::Repo::with_revision(
            repo.to_string(),
            hf_hub::RepoType::Model,
            revision.unwrap_or("main").to_string(),
        );
        let repo_api = api.repo(repo_ref);
        let info = runtime
            .block_on(repo_api.info())
            .map_err(|e| hub_error(&label, "(repo listing)", e))?;
        let listing = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok(Self {
            label,
            runtime,
            repo: repo_api,
            listing,
        })
    }
}

impl ModelFiles {
    /// Resolves a source to its files; `demo` writes its weights under `data_dir` first if needed.
    pub fn resolve(source: &ModelSource, data_dir: &Path) -> Result<Self, LoadError> {
        match source {
            ModelSource::Demo => Ok(ModelFiles::Dir(demo::ensure_demo_weights(data_dir)?)),
            ModelSource::Dir(path) => {
                if !path.is_dir() {
                    return Err(LoadError::BadSource {
                        source_spec: source.to_string(),
                        reason: format!("{} is not a folder", path.display()),
                    });
                }
                Ok(ModelFiles::Dir(path.clone()))
            }
            ModelSource::Hub { repo, revision } => Ok(ModelFiles::Hub(Box::new(HubFiles::open(
                repo,
                revision.as_deref(),
            )?))),
        }
    }

    /// Whether the layout has `rel` (used to pick between alternative layouts).
    pub fn has(&self, rel: &str) -> bool {
        match self {
            ModelFiles::Dir(root) => root.join(rel).is_file(),
            ModelFiles::Hub(h) => h.listing.contains(rel),
        }
    }

    /// The local path of `rel`, downloading it if needed. `expected` says what the file holds,
    /// for the error when it is missing.
    pub fn get(&self, rel: &str, expected: &str) -> Result<PathBuf, LoadError> {
        match self {
            ModelFiles::Dir(root) => {
                let path = root.join(rel);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(LoadError::Missing {
                        file: path,
                        expected: expected.to_string(),
                    })
                }
            }
            ModelFiles::Hub(h) => {
                if !h.listing.contains(rel) {
                    return Err(LoadError::Missing {
                        file: PathBuf::from(format!("hub:{}/{rel}", h.label)),
                        expected: expected.to_string(),
                    });
                }
                tracing::info!(repo = %h.label, file = rel, "fetching from the hub (cached after the first time)");
                h.runtime
                    .block_on(h.repo.get(rel))
                    .map_err(|e| hub_error(&h.label, rel, e))
            }
        }
    }

    /// Where the files are, for status reports.
    pub fn describe(&self) -> String {
        match self {
            ModelFiles::Dir(root) => root.display().to_string(),
            ModelFiles::Hub(h) => format!("hub:{}", h.label),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("demo".parse::<ModelSource>().unwrap(), ModelSource::Demo);
        assert_eq!(
            "hub:black-forest-labs/FLUX.1-schnell@v1"
                .parse::<ModelSource>()
                .unwrap(),
            ModelSource::Hub {
                repo: "black-forest-labs/FLUX.1-schnell".into(),
                revision: Some("v1".into())
            }
        );
        assert_eq!(
            "dir:/models/flux".parse::<ModelSource>().unwrap(),
            ModelSource::Dir("/models/flux".into())
        );
        for bad in [
            "hub:noslash",
            "hub:a/b/c",
            "hub:../x",
            "hub:a/b@",
            "dir:",
            "s3://x",
            "",
        ] {
            assert!(bad.parse::<ModelSource>().is_err(), "{bad}");
        }
        let s = ModelSource::Hub {
            repo: "a/b".into(),
            revision: Some("r".into()),
        };
        assert_eq!(s.to_string().parse::<ModelSource>().unwrap(), s);
    }

    #[test]
    fn missing_dir_file_is_named() {
        let dir = std::env::temp_dir();
        let files = ModelFiles::Dir(dir.clone());
        let e = files
            .get("nope/ae.safetensors", "the autoencoder")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nope/ae.safetensors") && e.contains("the autoencoder"),
            "{e}"
        );
    }
}

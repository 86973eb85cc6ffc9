//! MNIST and Fashion-MNIST from Hugging Face's parquet conversion, read through candle-datasets
//! (`data.source = "hub:mnist"` or `"hub:fashion-mnist"`; cargo feature `hub`).
//!
//! candle-datasets 0.11.1 on hf-hub 1.0 asks for a dataset repo at revision
//! `refs/convert/parquet`, for the files `<dir>/{train,test}/0000.parquet`. It looks in the local
//! cache first and makes no request on a hit:
//! - the cache is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
//! - the repo lives in `datasets--<owner>--<name>`, whose `refs/refs/convert/parquet` holds a
//!   commit hash H;
//! - the files are under `snapshots/H/`.
//!
//! On a miss it silently goes to the network, and it unwraps the PNG decode. So this module checks
//! the cache itself first: a missing file is one line naming it and how to fetch it, and a damaged
//! file is one line too, never a panic. `vae` itself never goes to the network.

use super::{Dataset, Split};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// One of the data sets candle-datasets can load.
struct HubSet {
    source: &'static str,
    repo: &'static str,
    dir: &'static str,
    classes: &'static [&'static str],
    load: fn() -> candle_core::Result<candle_datasets::vision::Dataset>,
}

const REVISION: &str = "refs/convert/parquet";

const SETS: &[HubSet] = &[
    HubSet {
        source: "hub:mnist",
        repo: "ylecun/mnist",
        dir: "mnist",
        classes: &[],
        load: candle_datasets::vision::mnist::load,
    },
    HubSet {
        source: "hub:fashion-mnist",
        repo: "zalando-datasets/fashion_mnist",
        dir: "fashion_mnist",
        classes: &[
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
        load: candle_datasets::vision::fashion_mnist::load,
    },
];

/// The Hugging Face cache directory, in hf-hub's order of environment variables.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    let home = var("HF_HOME")
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("huggingface")))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache/huggingface")
        });
    home.join("hub")
}

/// The cached files of `set`, (train, test), or one line naming the first one missing.
fn cached(set: &HubSet, cache: &Path) -> Result<(PathBuf, PathBuf)> {
    let repo = cache.join(format!("datasets--{}", set.repo.replace('/', "--")));
    let fetch = format!(
        "fetch it once with network access: huggingface-cli download {} --repo-type dataset \
         --revision {REVISION} {d}/train/0000.parquet {d}/test/0000.parquet (the cache is \
         $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)",
        set.repo,
        d = set.dir
    );
    let refs = repo.join("refs").join(REVISION);
    let hash = std::fs::read_to_string(&refs).map_err(|_| {
        anyhow!(
            "{}: {} is not in the Hugging Face cache; {fetch}",
            set.source,
            refs.display()
        )
    })?;
    let snap = repo.join("snapshots").join(hash.trim());
    let file = |split: &str| -> Result<PathBuf> {
        let p = snap.join(format!("{}/{split}/0000.parquet", set.dir));
        if !p.is_file() {
            bail!(
                "{}: {} is not in the Hugging Face cache; {fetch}",
                set.source,
                p.display()
            );
        }
        Ok(p)
    };
    Ok((file("train")?, file("test")?))
}

/// Runs candle-datasets' loader with panics turned into errors (it unwraps the PNG decode), and
/// without the panic message on stderr.
fn load_quietly(set: &HubSet) -> Result<candle_datasets::vision::Dataset> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(set.load);
    std::panic::set_hook(hook);
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(anyhow!("{e}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(anyhow!("{}", msg.lines().next().unwrap_or_default()))
        }
    }
}

fn split(
    images: &candle_core::Tensor,
    labels: &candle_core::Tensor,
    set: &HubSet,
) -> Result<Split> {
    let (n, d) = images.dims2()?;
    if d != 28 * 28 {
        bail!("{}: images of {d} pixels, expected 28 x 28", set.source);
    }
    // candle-datasets gives b / 255 as f32; b is recovered exactly by rounding.
    let images: Vec<u8> = images
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    Ok(Split {
        images,
        labels: labels.to_vec1::<u8>()?,
        n,
        rows: 28,
        cols: 28,
        channels: 1,
        classes: set.classes.iter().map(|s| s.to_string()).collect(),
    })
}

/// Loads `source` ("hub:mnist" or "hub:fashion-mnist") from the local Hugging Face cache.
pub fn load(source: &str) -> Result<Dataset> {
    let set = SETS.iter().find(|s| s.source == source).ok_or_else(|| {
        anyhow!(
            "key `data.source`: {source:?}; use one of {:?}",
            crate::config::HUB_SOURCES
        )
    })?;
    let cache = cache_dir();
    let (train_file, test_file) = cached(set, &cache)?;
    let ds = load_quietly(set).with_context(|| {
        format!(
            "{}: cannot read {} or {} (damaged? delete them and fetch again)",
            set.source,
            train_file.display(),
            test_file.display()
        )
    })?;
    Ok(Dataset {
        dir: train_file.parent().map(Path::to_path_buf).unwrap_or(cache),
        train: split(&ds.train_images, &ds.train_labels, set)?,
        test: split(&ds.test_images, &ds.test_labels, set)?,
    })
}

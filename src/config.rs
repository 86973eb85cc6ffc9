//! The run configuration: TOML with `[data]`, `[model]` and `[train]` sections, every key
//! defaulted (the defaults are the reference recipe of pytorch/examples `vae/main.py`, listed with
//! comments in `configs/mnist.toml`), `--set key=value` overrides, unknown keys rejected by name.
//!
//! The shipped configs are compiled in, so `--config mnist.toml` works from any directory.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The values `data.source` takes (read by `data::hub` with the cargo feature `hub`).
pub const HUB_SOURCES: [&str; 2] = ["hub:mnist", "hub:fashion-mnist"];

/// The configs in `configs/`, embedded so a bare name resolves wherever the binary runs.
pub const SHIPPED: &[(&str, &str)] = &[
    ("mnist.toml", include_str!("../configs/mnist.toml")),
    ("mnist-2d.toml", include_str!("../configs/mnist-2d.toml")),
    (
        "mnist-gaussian.toml",
        include_str!("../configs/mnist-gaussian.toml"),
    ),
    (
        "mnist-warmup.toml",
        include_str!("../configs/mnist-warmup.toml"),
    ),
    (
        "mnist-flows.toml",
        include_str!("../configs/mnist-flows.toml"),
    ),
    ("mnist-ae.toml", include_str!("../configs/mnist-ae.toml")),
    ("tiny.toml", include_str!("../configs/tiny.toml")),
    ("tiny-conv.toml", include_str!("../configs/tiny-conv.toml")),
    ("conv-vae.toml", include_str!("../configs/conv-vae.toml")),
    ("burda-vae.toml", include_str!("../configs/burda-vae.toml")),
    (
        "burda2-vae.toml",
        include_str!("../configs/burda2-vae.toml"),
    ),
    (
        "burda2-iwae5.toml",
        include_str!("../configs/burda2-iwae5.toml"),
    ),
    (
        "burda2-iwae5-short.toml",
        include_str!("../configs/burda2-iwae5-short.toml"),
    ),
    (
        "burda2-iwae50.toml",
        include_str!("../configs/burda2-iwae50.toml"),
    ),
    (
        "burda2-iwae50-short.toml",
        include_str!("../configs/burda2-iwae50-short.toml"),
    ),
    (
        "vamp-hvae-standard.toml",
        include_str!("../configs/vamp-hvae-standard.toml"),
    ),
    ("vamp-hvae.toml", include_str!("../configs/vamp-hvae.toml")),
    (
        "vamp-hvae-short.toml",
        include_str!("../configs/vamp-hvae-short.toml"),
    ),
    (
        "conv-hvae-standard.toml",
        include_str!("../configs/conv-hvae-standard.toml"),
    ),
    ("conv-hvae.toml", include_str!("../configs/conv-hvae.toml")),
    (
        "burda-iwae5.toml",
        include_str!("../configs/burda-iwae5.toml"),
    ),
    (
        "burda-iwae50.toml",
        include_str!("../configs/burda-iwae50.toml"),
    ),
    (
        "burda-iwae5-short.toml",
        include_str!("../configs/burda-iwae5-short.toml"),
    ),
    (
        "burda-iwae50-short.toml",
        include_str!("../configs/burda-iwae50-short.toml"),
    ),
    (
        "vamp-standard.toml",
        include_str!("../configs/vamp-standard.toml"),
    ),
    (
        "vamp-prior.toml",
        include_str!("../configs/vamp-prior.toml"),
    ),
    (
        "vamp-prior-short.toml",
        include_str!("../configs/vamp-prior-short.toml"),
    ),
    (
        "planar-flows10.toml",
        include_str!("../configs/planar-flows10.toml"),
    ),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub out_dir: String,
    pub seed: u64,
    pub device: String,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// MNIST-format IDX files, a folder of images, or a `.npy` / `.npz` file (`data::open`).
    #[serde(alias = "path")]
    pub dir: String,
    pub binarize: Binarize,
    pub limit: usize,
    pub test_limit: usize,
    /// Hold out the last N training images for validation (0 = none).
    pub valid: usize,
    /// 1 (grey) or 3 (RGB); absent: as the data is (grey when every image is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Resize every image to [height, width]; absent: all images must have one size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize: Option<[usize; 2]>,
    /// With no train/test split in the data, the share drawn (by a fixed seed) for the test set.
    pub test_fraction: f64,
    /// "hub:mnist" or "hub:fashion-mnist": the data from the Hugging Face cache instead of
    /// `dir` (cargo feature `hub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Binarize {
    /// Grey levels in [0, 1] used as Bernoulli targets, as pytorch/examples does.
    None,
    /// Each pixel drawn once from Bernoulli(grey level) with a fixed seed.
    Static,
    /// Training pixels redrawn every batch (the setting of published likelihoods); the test set
    /// is drawn once with a fixed seed.
    Dynamic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, from = "RawModel", into = "RawModel")]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// The widths between the data and the first (bottom) stochastic layer.
    pub hidden: Vec<usize>,
    /// Dimensions of the first (bottom) stochastic layer z1 (the only one of a one-layer model).
    pub latent: usize,
    /// The stochastic layers above the first, bottom up (empty: the one-layer model). In the
    /// config file: `latent = [100, 50]` and `hidden = [[200, 200], [100, 100]]`.
    pub upper: Vec<Upper>,
    /// How two stochastic layers connect.
    pub wiring: Wiring,
    pub activation: Activation,
    pub decoder: DecoderKind,
    pub sigma: f64,
    pub learn_sigma: bool,
    pub flows: usize,
    pub flow_params: FlowParams,
    pub output_bias: OutputBias,
    /// The prior p(z): the standard normal, or a mixture of `prior_components` learned Gaussians.
    pub prior: Prior,
    pub prior_components: usize,
    /// Clip of the encoder's log-variance (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logvar_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logvar_max: Option<f64>,
    /// The networks' kind: dense layers only, or convolutions before (and transposed
    /// convolutions after) the dense ones.
    pub arch: Arch,
    /// With `arch = "conv"`: per convolution, bottom first, [out channels, kernel, stride].
    pub conv: Vec<[usize; 3]>,
    /// The data's image shape [channels, height, width], set from the data when a model is built
    /// (not a config key): a convolution needs it.
    #[serde(skip)]
    pub image: Option<[usize; 3]>,
}

/// The networks' kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Dense layers (`model.hidden`) between the data and the latent heads.
    #[default]
    Mlp,
    /// Convolutions (`model.conv`) on the image, then the dense layers; the decoder mirrors them
    /// with transposed convolutions.
    Conv,
}

/// One convolution of a conv network: `c_in` -> `c_out` channels, a `k` x `k` kernel at stride
/// `s` with `p` zeros of padding, taking `h` x `w` images to `h / s` x `w / s`; the decoder's
/// transposed convolution takes them back with `op` rows of output padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvLayer {
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub op: usize,
    pub h: usize,
    pub w: usize,
}

impl ConvLayer {
    /// Values per image of the convolution's output: c_out (h / s) (w / s).
    pub fn out_size(&self) -> usize {
        self.c_out * (self.h / self.s) * (self.w / self.s)
    }
}

/// A stochastic layer above the first: its dimensions, and the widths of the networks between it
/// and the layer below (q(z_l | z_{l-1}) runs them upward, p(z_{l-1} | z_l) downward).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upper {
    pub latent: usize,
    pub hidden: Vec<usize>,
}

/// How two stochastic layers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wiring {
    /// Burda et al. (2015): q(z1|x) q(z2|z1); p(z2) p(z1|z2) p(x|z1).
    #[default]
    Chain,
    /// Tomczak & Welling (2018): q(z2|x) q(z1|x, z2); p(z2) p(z1|z2) p(x|z1, z2).
    Hvae,
}

/// `model.latent` as written: one number, or one per stochastic layer, bottom first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum LatentSpec {
    One(usize),
    Layers(Vec<usize>),
}

/// `model.hidden` as written: one list of widths, or one list per stochastic layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum HiddenSpec {
    Flat(Vec<usize>),
    Layers(Vec<Vec<usize>>),
}

/// `[model]` as the file has it; `ModelConfig` is the same with the stochastic layers split
/// into the first and those above it. A shape that does not fit (three latents, `hidden` with
/// another number of lists) becomes a model the validation refuses by key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawModel {
    kind: ModelKind,
    hidden: HiddenSpec,
    latent: LatentSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    wiring: Option<Wiring>,
    activation: Activation,
    decoder: DecoderKind,
    sigma: f64,
    learn_sigma: bool,
    flows: usize,
    flow_params: FlowParams,
    output_bias: OutputBias,
    prior: Prior,
    prior_components: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    logvar_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logvar_max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arch: Option<Arch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conv: Option<Vec<[usize; 3]>>,
}

impl Default for RawModel {
    fn default() -> Self {
        ModelConfig::default().into()
    }
}

/// Marks a `[model]` whose layers do not fit together, for `validate` to name: an entry of
/// `upper` with this latent (never a real one) carries [lists of `hidden`, layers of `latent`].
const SHAPE_MISMATCH: usize = usize::MAX;

impl From<RawModel> for ModelConfig {
    fn from(r: RawModel) -> Self {
        let latents = match r.latent {
            LatentSpec::One(z) => vec![z],
            LatentSpec::Layers(v) => v,
        };
        let hidden: Vec<Vec<usize>> = match r.hidden {
            HiddenSpec::Flat(h) => vec![h],
            HiddenSpec::Layers(v) => v,
        };
        let first = latents.first().copied().unwrap_or(0);
        let mut upper: Vec<Upper> = latents
            .iter()
            .skip(1)
            .enumerate()
            .map(|(i, &z)| Upper {
                latent: z,
                hidden: hidden.get(i + 1).cloned().unwrap_or_default(),
            })
            .collect();
        if hidden.len() != latents.len() || latents.is_empty() {
            // `validate` names it: the lists of `hidden` must match the layers of `latent`.
            upper.push(Upper {
                latent: SHAPE_MISMATCH,
                hidden: vec![hidden.len(), latents.len()],
            });
        }
        ModelConfig {
            kind: r.kind,
            hidden: hidden.first().cloned().unwrap_or_default(),
            latent: first,
            upper,
            wiring: r.wiring.unwrap_or_default(),
            activation: r.activation,
            decoder: r.decoder,
            sigma: r.sigma,
            learn_sigma: r.learn_sigma,
            flows: r.flows,
            flow_params: r.flow_params,
            output_bias: r.output_bias,
            prior: r.prior,
            prior_components: r.prior_components,
            logvar_min: r.logvar_min,
            logvar_max: r.logvar_max,
            arch: r.arch.unwrap_or_default(),
            conv: r.conv.unwrap_or_else(default_conv),
            image: None,
        }
    }
}

/// `model.conv`'s default: Kingma & Welling-style 4x4 stride-2 convolutions of 32 and 64
/// channels (the peer's `--arch conv --channels 32,64`).
fn default_conv() -> Vec<[usize; 3]> {
    vec![[32, 4, 2], [64, 4, 2]]
}

impl From<ModelConfig> for RawModel {
    fn from(m: ModelConfig) -> Self {
        let (latent, hidden, wiring) = if m.upper.is_empty() {
            (LatentSpec::One(m.latent), HiddenSpec::Flat(m.hidden), None)
        } else {
            let mut z = vec![m.latent];
            let mut h = vec![m.hidden];
            for u in m.upper {
                z.push(u.latent);
                h.push(u.hidden);
            }
            (LatentSpec::Layers(z), HiddenSpec::Layers(h), Some(m.wiring))
        };
        RawModel {
            kind: m.kind,
            hidden,
            latent,
            wiring,
            activation: m.activation,
            decoder: m.decoder,
            sigma: m.sigma,
            learn_sigma: m.learn_sigma,
            flows: m.flows,
            flow_params: m.flow_params,
            output_bias: m.output_bias,
            prior: m.prior,
            prior_components: m.prior_components,
            logvar_min: m.logvar_min,
            logvar_max: m.logvar_max,
            // An MLP's file says nothing of convolutions (and reads as before this key).
            arch: (m.arch == Arch::Conv).then_some(Arch::Conv),
            conv: (m.arch == Arch::Conv).then_some(m.conv),
        }
    }
}

impl ModelConfig {
    /// A conv network's layers on `image` [channels, height, width]: padding (k - s) / 2 rounded
    /// up, so that a stride-s layer maps a side of n to n / s exactly, and the transposed
    /// convolution's output padding that maps n / s back to n. Errors name the layer and sizes.
    pub fn conv_layers(&self, image: [usize; 3]) -> anyhow::Result<Vec<ConvLayer>> {
        let [mut c, mut h, mut w] = image;
        let mut v = Vec::new();
        for (i, &[c_out, k, s]) in self.conv.iter().enumerate() {
            if h % s != 0 || w % s != 0 {
                bail!(
                    "key `model.conv[{i}]` (stride {s}): the layer's input is {h} x {w}, which stride {s} does not divide;                      use sizes divisible by the strides' product (`data.resize`) or a smaller stride"
                );
            }
            let p = k.saturating_sub(s).div_ceil(2);
            let side = |n: usize| (n + 2 * p).checked_sub(k).map(|m| m / s + 1);
            if side(h) != Some(h / s) || side(w) != Some(w / s) {
                bail!(
                    "key `model.conv[{i}]` (kernel {k}, stride {s}): no padding maps {h} x {w} to {} x {} exactly; use a kernel of at least the stride",
                    h / s,
                    w / s
                );
            }
            let op = s + 2 * p - k;
            v.push(ConvLayer {
                c_in: c,
                c_out,
                k,
                s,
                p,
                op,
                h,
                w,
            });
            (c, h, w) = (c_out, h / s, w / s);
        }
        Ok(v)
    }

    /// The image shape a conv model was built for, or an error saying it is missing.
    pub fn image_shape(&self) -> anyhow::Result<[usize; 3]> {
        self.image
            .ok_or_else(|| anyhow::anyhow!("a conv model needs the data's image shape (internal: set `ModelConfig::image` before building it)"))
    }

    /// The width of the dense layers' input (encoder) and output (decoder): the data's for an
    /// MLP, the last convolution's for a conv network.
    pub fn dense_input(&self, dim: usize) -> anyhow::Result<usize> {
        match self.arch {
            Arch::Mlp => Ok(dim),
            Arch::Conv => Ok(self
                .conv_layers(self.image_shape()?)?
                .last()
                .map_or(dim, |l| l.out_size())),
        }
    }

    /// Stochastic layers: 1, or 2 with `upper`.
    pub fn layers(&self) -> usize {
        1 + self.upper.len()
    }

    /// Dimensions of the top stochastic layer, the one the prior is on (the pictures' space).
    pub fn top_latent(&self) -> usize {
        self.upper.last().map_or(self.latent, |u| u.latent)
    }

    /// Standard normals one sample of every stochastic layer takes: Z1 (+ Z2).
    pub fn noise_dim(&self) -> usize {
        self.latent + self.upper.iter().map(|u| u.latent).sum::<usize>()
    }
}

/// The prior p(z).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prior {
    /// N(0, I): the KL has a closed form.
    Normal,
    /// (1/K) sum_k N(m_k, diag exp(lv_k)) with learned means and log-variances; the KL is the
    /// one-sample estimate log q(z|x) - log p(z).
    Mog,
    /// Tomczak & Welling's VampPrior: (1/K) sum_k q(z | u_k) over K learned pseudo-inputs u_k
    /// (clipped to [0, 1]); the KL is the one-sample estimate, as for `mog`.
    Vamp,
}

/// How the decoder's output bias starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputBias {
    /// As every other bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default.
    Default,
    /// The logit of each training pixel's mean, clipped to [0.001, 0.999] (Burda et al.'s code),
    /// so the untrained decoder already outputs the mean image.
    DataMean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// The variational autoencoder.
    Vae,
    /// The same networks with z = mu: no sampling and no KL (the baseline).
    Ae,
}

/// Where a planar flow's parameters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowParams {
    /// An encoder head gives each image its own flow (Rezende & Mohamed 2015, section 4).
    Amortized,
    /// One flow shared by all images.
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    Softplus,
    Sigmoid,
    Gelu,
    /// Clevert et al. (2016): a for a > 0, e^a - 1 otherwise (the IAF paper's networks).
    Elu,
    /// A gated dense layer (Dauphin et al. 2017; Tomczak & Welling 2018): h = (W1 x + b1) *
    /// sigmoid(W2 x + b2), the gate a second linear map of the same input.
    Gated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    Bernoulli,
    Gaussian,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub eval_batch_size: usize,
    pub engine: EngineKind,
    pub beta: f64,
    pub kl_warmup_epochs: usize,
    pub free_bits: f64,
    pub mc_samples: usize,
    pub iw_samples: usize,
    pub lr_schedule: LrSchedule,
    pub lr_gamma: f64,
    pub lr_step_epochs: usize,
    pub lr_min: f64,
    /// Stop after this many epochs without a better validation -ELBO (0 = never).
    pub patience: usize,
    /// Adam on each parameter tensor's gradient divided by its L2 norm (AdamNormGrad).
    pub normalize_grad: bool,
    /// Evaluate the test set (and draw the epoch's pictures) every N epochs and at the last.
    pub eval_every: usize,
    /// Adam, or Adamax (the IAF paper's optimizer).
    pub optimizer: Optimizer,
    /// Decay of a moving average of the weights that evaluation, the checkpoint's model and the
    /// pictures use (0: none).
    pub ema: f64,
}

/// The update rule of `train.optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Kingma & Ba 2015, Algorithm 1 (PyTorch's `torch.optim.Adam`).
    #[default]
    Adam,
    /// Kingma & Ba 2015, section 7.1: the infinity norm in place of the second moment
    /// (PyTorch's `torch.optim.Adamax`).
    Adamax,
}

/// How the learning rate moves over epochs (`schedule::lr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `train.lr` throughout.
    Constant,
    /// Burda et al. (2015): lr * 10^(-i/7) for 3^i epochs, i = 0..7 (3,280 epochs in all).
    Burda,
    /// lr * lr_gamma^(epoch - 1).
    Exponential,
    /// lr * lr_gamma^floor((epoch - 1) / lr_step_epochs).
    Step,
    /// From lr down to lr_min over `train.epochs` on a half cosine.
    Cosine,
}

/// How a training step is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The fused CPU step on the CPU, candle autograd on a GPU.
    Auto,
    /// The hand-written CPU step (`fused`): the fast path.
    Fused,
    /// Candle's autograd: any device and any model.
    Autograd,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "mnist".into(),
            out_dir: "runs".into(),
            seed: 1,
            device: "auto".into(),
            data: DataConfig::default(),
            model: ModelConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: "data/mnist".into(),
            binarize: Binarize::None,
            limit: 0,
            test_limit: 0,
            valid: 0,
            channels: None,
            resize: None,
            test_fraction: 0.1,
            source: None,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Vae,
            hidden: vec![400],
            latent: 20,
            activation: Activation::Relu,
            decoder: DecoderKind::Bernoulli,
            sigma: 1.0,
            learn_sigma: false,
            flows: 0,
            flow_params: FlowParams::Amortized,
            output_bias: OutputBias::Default,
            prior: Prior::Normal,
            prior_components: 10,
            logvar_min: None,
            logvar_max: None,
            upper: vec![],
            wiring: Wiring::Chain,
            arch: Arch::Mlp,
            conv: default_conv(),
            image: None,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            eval_batch_size: 1000,
            engine: EngineKind::Auto,
            beta: 1.0,
            kl_warmup_epochs: 0,
            free_bits: 0.0,
            mc_samples: 1,
            iw_samples: 1,
            lr_schedule: LrSchedule::Constant,
            lr_gamma: 0.5,
            lr_step_epochs: 10,
            lr_min: 0.0,
            patience: 0,
            normalize_grad: false,
            eval_every: 1,
            optimizer: Optimizer::Adam,
            ema: 0.0,
        }
    }
}

/// Where a config's text came from, for messages.
#[derive(Debug, Clone)]
pub struct Source {
    pub label: String,
    pub text: String,
}

/// Finds `arg` as a path, then as `configs/<arg>` in the working directory, then among the
/// shipped configs.
pub fn find(arg: &str) -> Result<Source> {
    if arg.trim().is_empty() {
        bail!("--config: empty name; give a file or one of the shipped configs");
    }
    let path = Path::new(arg);
    if path.is_dir() {
        bail!("--config {arg}: is a directory; give a .toml file");
    }
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config {arg}: cannot read"))?;
        return Ok(Source {
            label: arg.to_string(),
            text,
        });
    }
    // A name with a folder in it (`./x.toml`, `configs/x.toml`) is a path. Missing, it is a
    // shipped config only by its file name (so `--config configs/burda-vae.toml` works outside
    // a clone too); otherwise it is a typo, and the list of every shipped name would hide it.
    let is_path = arg.contains('/') || arg.contains(std::path::MAIN_SEPARATOR);
    let local = PathBuf::from("configs").join(arg);
    if !is_path && local.is_file() {
        let text = std::fs::read_to_string(&local)
            .with_context(|| format!("--config {}: cannot read", local.display()))?;
        return Ok(Source {
            label: local.display().to_string(),
            text,
        });
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(arg);
    if let Some((n, text)) = SHIPPED
        .iter()
        .find(|(n, _)| *n == name || n.trim_end_matches(".toml") == name)
    {
        return Ok(Source {
            label: format!("configs/{n} (built in)"),
            text: text.to_string(),
        });
    }
    if is_path {
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| ".".into());
        bail!(
            "--config {arg}: no such file (looked from {cwd}); check the path, or name a shipped \
             config without a folder, e.g. --config mnist.toml"
        );
    }
    let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
    bail!(
        "--config {arg}: no such file, and no configs/{arg}; give a path or one of the shipped configs: {}",
        names.join(", ")
    )
}

/// The config key a command-line flag of another tool most likely means, for the hint to
/// `vae train --epochs 5`: `--epochs` -> `train.epochs`. A flag is matched by the last part of
/// a key (`--batch-size` -> `train.batch_size`, `--free-bits` -> `train.free_bits`), else by a
/// few names other trainers use (`--batch`, `--learning-rate`, `--k`, `--data`).
pub fn key_for_flag(flag: &str) -> Option<String> {
    set_pair(flag, None)
}

/// `key=value` for `--set`, from another tool's flag and its value: `--hidden 200,200` ->
/// `model.hidden=[200,200]` (a list key's value gets its brackets), `--lr 3e-4` ->
/// `train.lr=3e-4`; without a value, only the key.
pub fn set_pair(flag: &str, value: Option<&str>) -> Option<String> {
    let f = flag
        .trim_start_matches('-')
        .replace('-', "_")
        .to_lowercase();
    let alias = match f.as_str() {
        "batch" | "bs" => "batch_size",
        "learning_rate" => "lr",
        "z" | "z_dim" | "latent_dim" | "latent_size" => "latent",
        "act" => "activation",
        "k" | "iw" => "iw_samples",
        "warmup" | "kl_warmup" => "kl_warmup_epochs",
        "data" | "data_dir" | "dataset" => "dir",
        "out" => "out_dir",
        other => other,
    };
    let cfg = Config::default().to_toml().ok()?;
    let table: toml::Table = toml::from_str(&cfg).ok()?;
    let mut keys = Vec::new();
    for (k, v) in &table {
        match v {
            toml::Value::Table(t) => keys.extend(t.keys().map(|s| format!("{k}.{s}"))),
            _ => keys.push(k.clone()),
        }
    }
    let key = keys
        .into_iter()
        .find(|k| k.rsplit('.').next() == Some(alias))?;
    let Some(v) = value else { return Some(key) };
    let list = match key.split_once('.') {
        Some((sec, leaf)) => matches!(
            table.get(sec).and_then(|t| t.get(leaf)),
            Some(toml::Value::Array(_))
        ),
        None => matches!(table.get(&key), Some(toml::Value::Array(_))),
    };
    if list && !v.trim_start().starts_with('[') {
        Some(format!("{key}=[{v}]"))
    } else {
        Some(format!("{key}={v}"))
    }
}

/// Parses `source`, applies `key=value` overrides, and checks the result.
pub fn resolve(source: &Source, overrides: &[String]) -> Result<Config> {
    let mut table: toml::Table = toml::from_str(&source.text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            source.label,
            one_line_toml_error(&source.text, &e)
        )
    })?;
    for ov in overrides {
        apply_override(&mut table, ov)?;
    }
    let value = toml::Value::Table(table);
    let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!(
            "{}: key `{}`: {}",
            blame(source, overrides, &path),
            path,
            e.into_inner().message().trim()
        )
    })?;
    if let Err(e) = cfg.validate() {
        // Validation names the key as "key `a.b`"; blame the --set that gave it, if one did.
        let text = e.to_string();
        let key = text
            .split_once("key `")
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(k, _)| k.to_string())
            .unwrap_or_default();
        bail!("{}: {text}", blame(source, overrides, &key));
    }
    Ok(cfg)
}

/// Who set `key`: the last `--set` whose key is it (or a section above it), else the file.
fn blame(source: &Source, overrides: &[String], key: &str) -> String {
    let set = overrides.iter().rev().find(|ov| {
        let k = ov.split_once('=').map_or(ov.as_str(), |(k, _)| k).trim();
        !k.is_empty() && (key == k || key.starts_with(&format!("{k}.")))
    });
    match set {
        Some(ov) => format!("--set {ov}"),
        None => source.label.clone(),
    }
}

fn one_line_toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    match line {
        Some(l) => format!("line {l}: {}", e.message().trim()),
        None => e.message().trim().to_string(),
    }
}

/// `train.lr=3e-4`: the value is read as TOML (numbers, booleans, arrays), else as a string.
fn apply_override(table: &mut toml::Table, ov: &str) -> Result<()> {
    let (key, raw) = ov
        .split_once('=')
        .with_context(|| format!("--set {ov}: expected key=value, e.g. --set train.lr=3e-4"))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("--set {ov}: empty key; expected key=value, e.g. --set train.lr=3e-4");
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(p.to_string(), value);
            break;
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("--set {ov}: `{}` is not a section", parts[..=i].join(".")),
        };
    }
    Ok(())
}

impl Config {
    /// The stochastic layers: at most two, `hidden` one list per layer, and the options that
    /// two layers do not (yet) combine with refused by key.
    fn validate_layers(&self) -> Result<()> {
        let m = &self.model;
        if let Some(u) = m.upper.iter().find(|u| u.latent == SHAPE_MISMATCH) {
            let (lists, layers) = (u.hidden[0], u.hidden[1]);
            if layers == 0 {
                bail!("key `model.latent` must list at least one dimension, e.g. 20 or [100, 50]");
            }
            bail!(
                "key `model.hidden`: {layers} stochastic layers (`model.latent`) need {layers} \
                 lists of widths, one per layer, e.g. hidden = [[200, 200], [100, 100]]; got {}",
                if lists == 1 {
                    "a flat list".to_string()
                } else {
                    format!("{lists} lists")
                }
            );
        }
        if m.upper.len() > 1 {
            bail!(
                "key `model.latent`: at most two stochastic layers, got {}",
                m.upper.len() + 1
            );
        }
        for (i, u) in m.upper.iter().enumerate() {
            if u.latent == 0 {
                bail!("key `model.latent[{}]` must be positive, got 0", i + 1);
            }
            if u.hidden.is_empty() {
                bail!(
                    "key `model.hidden[{}]` must list at least one width, e.g. [100, 100]",
                    i + 1
                );
            }
            if let Some(j) = u.hidden.iter().position(|&h| h == 0) {
                bail!("key `model.hidden[{}][{j}]` must be positive, got 0", i + 1);
            }
        }
        if m.arch == Arch::Conv {
            if m.conv.is_empty() {
                bail!("key `model.conv` must list at least one convolution [out channels, kernel, stride], e.g. [[32, 4, 2], [64, 4, 2]]");
            }
            for (i, l) in m.conv.iter().enumerate() {
                if l.contains(&0) {
                    bail!("key `model.conv[{i}]` = {l:?}: out channels, kernel and stride must be positive");
                }
            }
        }
        if !m.upper.is_empty() {
            let not_with = |key: &str, what: &str| -> Result<()> {
                bail!("key `{key}`: {what} is not built for two stochastic layers; use one layer (a single `model.latent`)")
            };
            if m.flows > 0 {
                not_with("model.flows", "planar flows")?;
            }
            if m.kind == ModelKind::Ae {
                not_with("model.kind", "the autoencoder")?;
            }
            if self.train.free_bits > 0.0 {
                not_with("train.free_bits", "free bits")?;
            }
            if m.prior == Prior::Vamp && m.wiring == Wiring::Chain {
                bail!("key `model.prior`: the VampPrior needs q(z2|x), which the chain wiring does not have; use model.wiring = \"hvae\" (Tomczak & Welling's) or another prior");
            }
        }
        Ok(())
    }

    /// Range checks serde cannot express; each message names the key.
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, key: &str| -> Result<()> {
            if v == 0 {
                bail!("key `{key}` must be positive, got 0");
            }
            Ok(())
        };
        let posf = |v: f64, key: &str| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("key `{key}` must be a positive finite number, got {v}");
            }
            Ok(())
        };
        if self.name.trim().is_empty()
            || self.name.contains(['/', '\\'])
            || self.name.starts_with('.')
        {
            bail!(
                "key `name` must be a plain directory name, got {:?}",
                self.name
            );
        }
        if self.out_dir.trim().is_empty() {
            bail!("key `out_dir` must not be empty");
        }
        if self.data.dir.trim().is_empty() {
            bail!("key `data.dir` must not be empty");
        }
        if let Some(c) = self.data.channels {
            if c != 1 && c != 3 {
                bail!("key `data.channels` must be 1 (grey) or 3 (RGB), got {c}");
            }
        }
        if let Some([h, w]) = self.data.resize {
            if h == 0 || w == 0 || h > 4096 || w > 4096 {
                bail!("key `data.resize` must be [height, width], each 1 to 4096, got [{h}, {w}]");
            }
        }
        if let Some(s) = &self.data.source {
            if !HUB_SOURCES.contains(&s.as_str()) {
                bail!(
                    "key `data.source`: {s:?}; use one of {:?} (or leave it out to read `data.dir`)",
                    HUB_SOURCES
                );
            }
        }
        let f = self.data.test_fraction;
        if !(f.is_finite() && f > 0.0 && f < 1.0) {
            bail!("key `data.test_fraction` must lie strictly between 0 and 1, got {f}");
        }
        self.validate_layers()?;
        if self.model.hidden.is_empty() {
            bail!("key `model.hidden` must list at least one width, e.g. [400]");
        }
        for (i, &h) in self.model.hidden.iter().enumerate() {
            pos(h, &format!("model.hidden[{i}]"))?;
        }
        pos(self.model.latent, "model.latent")?;
        pos(self.model.prior_components, "model.prior_components")?;
        let (lo, hi) = (
            self.model.logvar_min.unwrap_or(f64::NEG_INFINITY),
            self.model.logvar_max.unwrap_or(f64::INFINITY),
        );
        if lo.is_nan() || hi.is_nan() || lo >= hi {
            bail!(
                "keys `model.logvar_min` and `model.logvar_max`: need min < max, got {lo} and {hi}"
            );
        }
        posf(self.model.sigma, "model.sigma")?;
        pos(self.train.epochs, "train.epochs")?;
        pos(self.train.batch_size, "train.batch_size")?;
        pos(self.train.eval_batch_size, "train.eval_batch_size")?;
        posf(self.train.lr, "train.lr")?;
        posf(self.train.adam_eps, "train.adam_eps")?;
        if !(self.train.weight_decay.is_finite() && self.train.weight_decay >= 0.0) {
            bail!(
                "key `train.weight_decay` must be >= 0, got {}",
                self.train.weight_decay
            );
        }
        for (v, key) in [
            (self.train.beta1, "train.beta1"),
            (self.train.beta2, "train.beta2"),
            (self.train.ema, "train.ema"),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("key `{key}` must be in [0, 1), got {v}");
            }
        }
        crate::device::parse(&self.device).context("key `device`")?;
        let t = &self.train;
        if !(t.beta.is_finite() && t.beta >= 0.0) {
            bail!("key `train.beta` must be >= 0, got {}", t.beta);
        }
        if !(t.free_bits.is_finite() && t.free_bits >= 0.0) {
            bail!(
                "key `train.free_bits` must be >= 0 nats, got {}",
                t.free_bits
            );
        }
        pos(t.mc_samples, "train.mc_samples")?;
        pos(t.iw_samples, "train.iw_samples")?;
        pos(t.lr_step_epochs, "train.lr_step_epochs")?;
        pos(t.eval_every, "train.eval_every")?;
        if t.patience > 0 && self.data.valid == 0 {
            bail!("key `train.patience` stops on the validation -ELBO; set `data.valid = N` to hold out N training images");
        }
        if !(t.lr_gamma.is_finite() && t.lr_gamma > 0.0 && t.lr_gamma <= 1.0) {
            bail!("key `train.lr_gamma` must be in (0, 1], got {}", t.lr_gamma);
        }
        if !(t.lr_min.is_finite() && t.lr_min >= 0.0 && t.lr_min <= t.lr) {
            bail!(
                "key `train.lr_min` must be in [0, train.lr = {}], got {}",
                t.lr,
                t.lr_min
            );
        }
        if t.mc_samples > 1 && t.iw_samples > 1 {
            bail!(
                "keys `train.mc_samples` and `train.iw_samples`: set one of them above 1, not both"
            );
        }
        let elbo_only = t.beta != 1.0 || t.kl_warmup_epochs > 0 || t.free_bits > 0.0;
        if t.iw_samples > 1 && elbo_only {
            bail!(
                "key `train.iw_samples`: the IWAE bound has no KL term to weigh; \
                 beta, kl_warmup_epochs and free_bits apply to the ELBO only"
            );
        }
        if t.free_bits > 0.0 && self.model.prior != Prior::Normal {
            bail!("key `train.free_bits` needs the closed-form per-dimension KL of the normal prior; `model.prior = \"mog\"` has none");
        }
        if self.model.prior == Prior::Vamp && self.model.flows > 0 {
            bail!("key `model.prior`: the VampPrior is a mixture of q(z|u_k) without flows; use `model.flows = 0` or another prior");
        }
        if self.model.kind == ModelKind::Ae && self.model.prior != Prior::Normal {
            bail!("key `model.prior`: an autoencoder has no prior; use `model.kind = \"vae\"`");
        }
        if t.free_bits > 0.0 && self.model.flows > 0 {
            bail!("key `train.free_bits` needs the analytic per-dimension KL, which flows replace; use one or the other");
        }
        if self.model.kind == ModelKind::Ae
            && (self.model.flows > 0 || t.iw_samples > 1 || t.mc_samples > 1 || elbo_only)
        {
            bail!(
                "key `model.kind`: \"ae\" has no sampling and no KL; flows, mc_samples, \
                 iw_samples, beta, kl_warmup_epochs and free_bits do not apply"
            );
        }
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("serializing the resolved config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(text: &str) -> Source {
        Source {
            label: "test.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn other_tools_flags_map_to_config_keys() {
        let k = |f| key_for_flag(f);
        assert_eq!(k("--epochs").as_deref(), Some("train.epochs"));
        assert_eq!(k("--batch-size").as_deref(), Some("train.batch_size"));
        assert_eq!(k("--batch").as_deref(), Some("train.batch_size"));
        assert_eq!(k("--learning-rate").as_deref(), Some("train.lr"));
        assert_eq!(k("--lr").as_deref(), Some("train.lr"));
        assert_eq!(k("--latent").as_deref(), Some("model.latent"));
        assert_eq!(k("--free-bits").as_deref(), Some("train.free_bits"));
        assert_eq!(k("--data").as_deref(), Some("data.dir"));
        assert_eq!(k("--seed").as_deref(), Some("seed"));
        assert_eq!(k("--frobnicate"), None);
        assert_eq!(
            set_pair("--hidden", Some("200,200")).as_deref(),
            Some("model.hidden=[200,200]")
        );
        assert_eq!(
            set_pair("--hidden", Some("[400]")).as_deref(),
            Some("model.hidden=[400]")
        );
        assert_eq!(
            set_pair("--epochs", Some("5")).as_deref(),
            Some("train.epochs=5")
        );
    }

    #[test]
    fn a_config_path_that_is_missing_is_not_looked_up_by_name() {
        let e = find("./nosuch.toml").unwrap_err().to_string();
        assert!(e.contains("--config ./nosuch.toml: no such file"), "{e}");
        assert!(!e.contains("configs/./"), "{e}");
        assert!(
            !e.contains("tiny.toml"),
            "no list of every shipped name: {e}"
        );
        // A path whose file name is a shipped config's finds the built-in copy (outside a clone).
        assert!(find("elsewhere/mnist.toml")
            .unwrap()
            .label
            .contains("built in"));
        // A bare name still finds the built-in copy.
        assert!(find("tiny").is_ok());
    }

    #[test]
    fn empty_file_gives_reference_recipe() {
        let c = resolve(&src(""), &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.model.hidden, vec![400]);
        assert_eq!(c.model.latent, 20);
        assert_eq!(c.train.batch_size, 128);
        assert_eq!(c.train.weight_decay, 0.0);
    }

    #[test]
    fn shipped_mnist_equals_defaults() {
        // configs/mnist.toml lists every key at its default value.
        let s = find("mnist.toml").unwrap();
        let c = resolve(&s, &[]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn all_shipped_configs_parse() {
        for (n, _) in SHIPPED {
            let s = find(n).unwrap();
            resolve(&s, &[]).unwrap();
        }
    }

    #[test]
    fn every_config_file_is_shipped() {
        // A file added to configs/ but not to SHIPPED would not be found by `--config NAME`
        // outside the source tree.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        files.sort();
        let mut shipped: Vec<String> = SHIPPED.iter().map(|(n, _)| n.to_string()).collect();
        shipped.sort();
        assert_eq!(files, shipped);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = resolve(&src("[train]\nlrr = 0.1\n"), &[]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("train"), "{msg}");
        assert!(msg.contains("lrr"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = resolve(&src("[train]\nlr = \"fast\"\n"), &[]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("train.lr"), "{msg}");
    }

    #[test]
    fn syntax_error_gives_line() {
        let e = resolve(&src("seed = 1\n[train\n"), &[]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn overrides_apply_and_type_check() {
        let c = resolve(
            &src("[train]\nlr = 0.1\n"),
            &[
                "train.lr=3e-4".into(),
                "model.hidden=[500, 300]".into(),
                "data.binarize=dynamic".into(),
                "seed=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.model.hidden, vec![500, 300]);
        assert_eq!(c.data.binarize, Binarize::Dynamic);
        assert_eq!(c.seed, 7);
        let e = resolve(&src(""), &["train.nope=1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("nope"));
        let e = resolve(&src(""), &["train.epochs=many".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("train.epochs"));
        let e = resolve(&src("seed = 3\n"), &["seed.x=1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("not a section"));
    }

    #[test]
    fn non_positive_sizes_rejected() {
        for ov in [
            "train.batch_size=0",
            "model.latent=0",
            "train.epochs=0",
            "model.hidden=[]",
        ] {
            let e = resolve(&src(""), &[ov.into()]).unwrap_err();
            let key = ov.split('=').next().unwrap();
            assert!(format!("{e:#}").contains(key), "{ov}: {e:#}");
        }
        let e = resolve(&src(""), &["train.lr=-1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("train.lr"));
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = resolve(&src(""), &["model.hidden=[7,5]".into()]).unwrap();
        let text = c.to_toml().unwrap();
        let back = resolve(&src(&text), &[]).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn two_stochastic_layers_parse_round_trip_and_refuse_what_they_lack() {
        let two = "[model]\nlatent = [100, 50]\nhidden = [[200, 200], [100, 100]]\nactivation = \"tanh\"\n";
        let c = resolve(&src(two), &[]).unwrap();
        assert_eq!(
            (c.model.latent, c.model.hidden.clone()),
            (100, vec![200, 200])
        );
        assert_eq!(
            c.model.upper,
            vec![Upper {
                latent: 50,
                hidden: vec![100, 100]
            }]
        );
        assert_eq!(c.model.wiring, Wiring::Chain);
        assert_eq!(
            (c.model.layers(), c.model.top_latent(), c.model.noise_dim()),
            (2, 50, 150)
        );
        // The resolved config writes the file's shape back, and reads back the same.
        let text = c.to_toml().unwrap();
        assert!(text.contains("latent = [100, 50]"), "{text}");
        assert!(text.contains("hidden = [[200, 200], [100, 100]]"), "{text}");
        assert_eq!(resolve(&src(&text), &[]).unwrap(), c);
        // One layer is written as before: a number and a flat list, no wiring.
        let one = Config::default().to_toml().unwrap();
        assert!(
            one.contains("latent = 20") && !one.contains("wiring"),
            "{one}"
        );
        // A list of one latent is the one-layer model.
        let c = resolve(&src("[model]\nlatent = [8]\nhidden = [[16]]\n"), &[]).unwrap();
        assert_eq!((c.model.latent, c.model.upper.len()), (8, 0));
        // Shapes that do not fit, each one line naming the key.
        for (text, needle) in [
            (
                "[model]\nlatent = [100, 50]\nhidden = [200, 200]\n",
                "key `model.hidden`: 2 stochastic layers",
            ),
            (
                "[model]\nlatent = [10, 5, 2]\nhidden = [[8], [8], [8]]\n",
                "key `model.latent`: at most two stochastic layers, got 3",
            ),
            (
                "[model]\nlatent = []\n",
                "key `model.latent` must list at least one",
            ),
            (
                "[model]\nlatent = [10, 0]\nhidden = [[8], [8]]\n",
                "key `model.latent[1]` must be positive",
            ),
            (
                "[model]\nlatent = [10, 5]\nhidden = [[8], []]\n",
                "key `model.hidden[1]` must list",
            ),
        ] {
            let e = format!("{:#}", resolve(&src(text), &[]).unwrap_err());
            assert!(e.contains(needle), "{text}: {e}");
        }
        for (set, needle) in [
            ("model.flows=2", "key `model.flows`"),
            ("model.kind=ae", "key `model.kind`"),
            (
                "model.prior=vamp",
                "key `model.prior`: the VampPrior needs q(z2|x)",
            ),
            ("train.free_bits=0.5", "key `train.free_bits`"),
        ] {
            let e = format!("{:#}", resolve(&src(two), &[set.to_string()]).unwrap_err());
            assert!(e.contains(needle), "{set}: {e}");
        }
        // The fused step builds both wirings.
        resolve(&src(two), &["train.engine=fused".into()]).unwrap();
        resolve(
            &src(two),
            &["train.engine=fused".into(), "model.wiring=hvae".into()],
        )
        .unwrap();
        // The mixture prior on the top layer is built, and the hvae wiring with any prior.
        resolve(&src(two), &["model.prior=mog".into()]).unwrap();
        let h = resolve(
            &src(two),
            &["model.wiring=hvae".into(), "model.prior=vamp".into()],
        )
        .unwrap();
        assert_eq!(h.model.wiring, Wiring::Hvae);
        assert!(h.to_toml().unwrap().contains("wiring = \"hvae\""));
    }
}

#[cfg(test)]
mod conv_tests {
    use super::*;

    fn conv(layers: Vec<[usize; 3]>) -> ModelConfig {
        ModelConfig {
            arch: Arch::Conv,
            conv: layers,
            ..Default::default()
        }
    }

    #[test]
    fn conv_layers_pad_to_halve_exactly() {
        // 28: kernel 4 stride 2 needs padding (4 - 2) / 2 = 1 -> 14, output padding 2 + 2 - 4 = 0;
        // kernel 3 stride 2: padding ceil(1 / 2) = 1 -> 7, output padding 2 + 2 - 3 = 1;
        // kernel 5 stride 1: padding 2 -> 7.
        let v = conv(vec![[32, 4, 2], [64, 3, 2], [8, 5, 1]])
            .conv_layers([1, 28, 28])
            .unwrap();
        let got: Vec<_> = v.iter().map(|l| (l.c_in, l.h, l.p, l.op)).collect();
        assert_eq!(got, [(1, 28, 1, 0), (32, 14, 1, 1), (64, 7, 2, 0)]);
        assert_eq!(v[2].out_size(), 8 * 7 * 7);
        // 7 does not halve: one line naming the layer and the size.
        let e = conv(vec![[32, 4, 2], [64, 4, 2], [8, 4, 2]])
            .conv_layers([1, 28, 28])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.conv[2]") && e.contains("7 x 7"), "{e}");
    }

    #[test]
    fn conv_keys_round_trip_and_mlp_files_stay_as_they_were() {
        let text = "[model]\narch = \"conv\"\nconv = [[8, 3, 1]]\n";
        let c = resolve(
            &Source {
                label: "t".into(),
                text: text.into(),
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.model.arch, c.model.conv.clone()),
            (Arch::Conv, vec![[8, 3, 1]])
        );
        assert!(c.to_toml().unwrap().contains("conv = [[8, 3, 1]]"));
        let m = Config::default().to_toml().unwrap();
        assert!(!m.contains("arch") && !m.contains("conv"), "{m}");
        let bad = "[model]\narch = \"conv\"\nconv = [[8, 0, 1]]\n";
        let e = resolve(
            &Source {
                label: "t".into(),
                text: bad.into(),
            },
            &[],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("model.conv[0]"), "{e:#}");
    }
}

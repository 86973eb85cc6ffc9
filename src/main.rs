//! The `vae` command line: parses arguments and dispatches to the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vae::picture::Output;
use vae::pictures::{self, Common};
use vae::{config, eval, train};

#[derive(Parser)]
#[command(
    name = "vae",
    version,
    about = "Variational autoencoder (Kingma & Welling 2013): train, evaluate, sample"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a config into a new run directory (runs/<name>/).
    Train {
        /// Config file; a bare name also finds configs/NAME and the shipped configs
        /// [default: mnist.toml].
        #[arg(long, short)]
        config: Option<String>,
        /// Override a config key, e.g. --set train.lr=3e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = key_value)]
        set: Vec<String>,
        /// Train into this directory instead of <out_dir>/<name>.
        #[arg(long, value_name = "DIR")]
        run: Option<PathBuf>,
        /// auto | cpu | cuda | cuda:N (overrides the config's `device`).
        #[arg(long, value_parser = device_name)]
        device: Option<String>,
        /// Print no config and no progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Continue the latest run (or --run DIR) from its last checkpoint; --set may change
        /// training keys, e.g. --set train.epochs=20 to train longer.
        #[arg(long, conflicts_with = "config")]
        resume: bool,
    },
    /// Evaluate a run's checkpoint on the whole test set: -ELBO, reconstruction, KL in nats.
    Eval {
        /// Run directory (default: the one runs/latest names).
        #[arg(long, value_name = "DIR")]
        run: Option<String>,
        /// auto | cpu | cuda | cuda:N (default: the run's config).
        #[arg(long, value_parser = device_name)]
        device: Option<String>,
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
        /// Also estimate -log p(x) with K importance samples per image (Burda et al. 2015; 5000
        /// is the published setting). Each image's estimate is kept in the run directory
        /// (iw-K.csv) as it is done: stopped (Ctrl-C, a lost machine), the same command
        /// continues where it stopped, with the figure of an unbroken run (CPU and GPU draw
        /// the same noise).
        #[arg(long, value_name = "K", default_value_t = 0, allow_negative_numbers = true,
              value_parser = count("samples per image", 0, 1_000_000))]
        iw: usize,
        /// Evaluate the first N test images only (0 = all).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = count("images", 0, usize::MAX))]
        limit: usize,
    },
    /// New images from the run's prior (N(0, I), or its mixture) decoded, as a PNG grid.
    ///
    /// With two stochastic layers, ancestral samples: z2 from the prior, z1 drawn from p(z1|z2)
    /// (its noise scaled by --temperature too), then the decoder.
    Sample {
        /// Number of images; the grid is as square as the count allows.
        #[arg(short, default_value_t = 64, allow_negative_numbers = true,
              value_parser = count("images", 1, pictures::MAX_CELLS))]
        n: usize,
        /// Seed of the draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Scale of z: below 1 favours typical images, above 1 the unusual.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = temperature)]
        temperature: f64,
        /// Draw a sample of p(x|z) (Bernoulli or Gaussian pixels) instead of the pixel means.
        #[arg(long)]
        draw: bool,
        #[command(flatten)]
        pic: PicArgs,
    },
    /// The learned latent manifold (Kingma & Welling, Figure 4) as a PNG grid.
    ///
    /// With two stochastic layers: the top layer z2, decoded through p(z1|z2)'s mean.
    Manifold {
        /// 2: a grid over two latent dimensions; 1: one row per latent dimension.
        #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = count("dimensions", 1, 2))]
        dim: usize,
        /// Points per axis, at the prior's quantiles.
        #[arg(long, default_value_t = 20, allow_negative_numbers = true, value_parser = count("points", 2, 100))]
        steps: usize,
        /// The two latent dimensions of a --dim 2 grid, e.g. --axes 3,7 (default: the two with
        /// the largest mean KL over the test set).
        #[arg(long, value_name = "I,J", value_parser = axes)]
        axes: Option<(usize, usize)>,
        #[command(flatten)]
        pic: PicArgs,
    },
    /// Test images above their reconstructions, as a PNG grid.
    ///
    /// Decoded at every layer's posterior mean: with two stochastic layers, z1's (the chain's
    /// mu1(x); the hvae's mu1(x, z2) at z2 = mu2(x)).
    Reconstruct {
        /// The first N test images.
        #[arg(short, default_value_t = 16, allow_negative_numbers = true,
              value_parser = count("images", 1, pictures::MAX_CELLS / 2))]
        n: usize,
        /// These test images instead, e.g. --index 3,17,42.
        #[arg(long, value_name = "I,J,...", value_parser = indices)]
        index: Option<Indices>,
        /// Image pairs per row.
        #[arg(long, default_value_t = 8, allow_negative_numbers = true,
              value_parser = count("columns", 1, pictures::MAX_CELLS / 2))]
        cols: usize,
        #[command(flatten)]
        pic: PicArgs,
    },
    /// Decoded images along the line between the latent means of two test images.
    ///
    /// With two stochastic layers: between their z2 means, decoded through p(z1|z2)'s mean.
    Interpolate {
        /// First test image.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = count("the image number", 0, usize::MAX))]
        from: usize,
        /// Second test image.
        #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = count("the image number", 0, usize::MAX))]
        to: usize,
        /// Points along the path, ends included.
        #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = count("points", 2, 100))]
        steps: usize,
        /// Add a row for the spherical (slerp) path.
        #[arg(long)]
        slerp: bool,
        #[command(flatten)]
        pic: PicArgs,
    },
    /// The run's training curves (-ELBO, reconstruction, KL per epoch) from its metrics.csv.
    Curves {
        #[command(flatten)]
        pic: PicArgs,
    },
    /// One self-contained HTML page to move through the latent space live in a browser.
    ///
    /// With two stochastic layers: the top layer z2, decoded through p(z1|z2)'s mean (the hvae
    /// wiring's decoder also reads z2).
    Explore {
        /// Put the first N test images' codes in the scatter (0 = all).
        #[arg(long, default_value_t = 5000, allow_negative_numbers = true, value_parser = count("images", 0, usize::MAX))]
        limit: usize,
        /// Weights in the page: f16 (half the size, pixels within 1/255) or f32 (exact).
        #[arg(long, value_enum, default_value_t = vae::explore::Precision::F16)]
        precision: vae::explore::Precision,
        /// Run directory (default: the one runs/latest names).
        #[arg(long, value_name = "DIR")]
        run: Option<String>,
        /// Output HTML file; `-` for standard output. Without it: standard output when that is
        /// not a terminal, else <run>/explore.html.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Every image's posterior q(z|x) as NumPy arrays in a .npz: mu, logvar (N, Z) and y.
    ///
    /// The top stochastic layer's mean and log-variance (the codes `vae decode` takes); with two
    /// layers also mu1, logvar1 (the bottom layer); with planar flows also z (the mean through
    /// the flows); labels as y where the data has them. `numpy.load(path)` reads it.
    Encode {
        /// Run directory (default: the one runs/latest names).
        #[arg(long, value_name = "DIR")]
        run: Option<String>,
        /// Images to encode instead of the run's data (any `data.dir` source of the same size).
        #[arg(long, value_name = "PATH")]
        data: Option<String>,
        /// Which split of the data.
        #[arg(long, value_enum, default_value_t = vae::codes::Which::Test)]
        split: vae::codes::Which,
        /// Output .npz; `-` for standard output. Without it: standard output when that is not
        /// a terminal, else <run>/codes-<split>.npz.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// auto | cpu | cuda | cuda:N (default: the run's config).
        #[arg(long, value_parser = device_name)]
        device: Option<String>,
    },
    /// Codes you made (N, Z) decoded to images: a PNG grid, or with -o X.npy the pixel means.
    ///
    /// CODES is a .npy of float32/float64 (N, Z), or a .npz holding `z` or `mu` (what `vae
    /// encode` writes). Decoded as the pictures decode: with two stochastic layers, top-layer
    /// codes through p(z1|z2)'s mean.
    Decode {
        /// The codes: a .npy (N, Z) or a .npz.
        #[arg(value_name = "CODES")]
        codes: PathBuf,
        /// Grid columns (default: as square as the count allows).
        #[arg(long, allow_negative_numbers = true,
              value_parser = count("columns", 1, pictures::MAX_CELLS))]
        cols: Option<usize>,
        #[command(flatten)]
        pic: PicArgs,
    },
    /// The test set's latent means, one dot per image coloured by class (PCA beyond 2-D).
    ///
    /// With two stochastic layers: the means of the top layer z2.
    Scatter {
        /// Use the first N test images only (0 = all).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = count("images", 0, usize::MAX))]
        limit: usize,
        #[command(flatten)]
        pic: PicArgs,
    },
}

/// Arguments every picture command takes.
#[derive(clap::Args)]
struct PicArgs {
    /// Run directory (default: the one runs/latest names).
    #[arg(long, value_name = "DIR")]
    run: Option<String>,
    /// Output PNG; `-` for standard output. Without it: standard output when that is not a
    /// terminal, else <run>/<command>.png.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Enlarge each image this many times.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = count("times", 1, 16))]
    scale: usize,
    /// auto | cpu | cuda | cuda:N (default: the run's config).
    #[arg(long, value_parser = device_name)]
    device: Option<String>,
}

/// Opens the run and resolves the output by the one rule of every picture command: `-o FILE`
/// (`-o -`: standard output) wins; else the PNG goes to standard output when that is not a
/// terminal (a pipe or a redirect), and to `<run>/<file>` when it is.
fn picture_run(p: &PicArgs, default_file: &str) -> Result<(eval::Loaded, Common)> {
    use std::io::IsTerminal;
    let l = eval::open(p.run.as_deref(), p.device.as_deref())?;
    let default = if std::io::stdout().is_terminal() {
        Output::File(l.dir.join(default_file))
    } else {
        Output::Stdout
    };
    let output = Output::from_arg(p.output.as_deref(), default, default_file);
    Ok((
        l,
        Common {
            output,
            scale: p.scale,
        },
    ))
}

/// A whole-number flag's parser: the value, or one message with the range, the same for `-n -5`,
/// `-n=-5` and `-n 0` (clap names the flag before it). Usage errors exit with status 2.
fn count(
    what: &'static str,
    lo: usize,
    hi: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let range = if hi == usize::MAX {
            format!("give a whole number >= {lo}")
        } else {
            format!("give {lo} to {hi} {what}")
        };
        match s.trim().parse::<i128>() {
            Ok(v) if v >= lo as i128 && v <= hi as i128 => Ok(v as usize),
            _ => Err(range),
        }
    }
}

/// `--temperature`: a finite number >= 0.
fn temperature(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("give a finite number >= 0 (1 samples the prior)".into()),
    }
}

/// clap's error as one line: its first line and its tips ("a similar subcommand exists", "to
/// pass '--confg' as a value, use ..."), without the usage block.
fn usage_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut out = lines.next().unwrap_or("error: bad arguments").to_string();
    for l in lines.filter(|l| l.starts_with("tip:")) {
        out.push_str("; ");
        out.push_str(l);
    }
    out.push_str(" (see vae --help)");
    out
}

/// An error and its causes on one line, each cause once: a context that already quotes its
/// cause (or a cause that repeats the one before, as some library errors do) is not said twice.
fn error_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if out.contains(&c) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c);
    }
    out
}

/// `--axes I,J`: two latent dimensions.
fn axes(s: &str) -> Result<(usize, usize), String> {
    match pictures::parse_indices(s).as_deref() {
        Ok([a, b]) => Ok((*a, *b)),
        _ => Err("expected two latent dimensions, e.g. --axes 0,1".into()),
    }
}

/// `--index I,J,...`'s test image numbers.
#[derive(Clone)]
struct Indices(Vec<usize>);

fn indices(s: &str) -> Result<Indices, String> {
    pictures::parse_indices(s)
        .map(Indices)
        .map_err(|e| format!("{e:#}"))
}

/// `--device`: its syntax here (usage, exit 2); whether the device opens is the command's.
fn device_name(s: &str) -> Result<String, String> {
    vae::device::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `--set KEY=VALUE`: the shape here; whether the key and value fit is the config's.
fn key_value(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() => Ok(s.to_string()),
        _ => Err("expected KEY=VALUE, e.g. --set train.lr=3e-4".into()),
    }
}

/// For `vae train --epochs 5`: the `--set` line that does what the unknown flag meant, when
/// its name is a config key's (`--epochs` -> `--set train.epochs=5`).
fn set_tip(err: &clap::Error, args: &[String]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    if args.get(1).map(String::as_str) != Some("train") {
        return None;
    }
    let Some(ContextValue::String(flag)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let (name, inline) = match flag.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (flag.as_str(), None),
    };
    // clap names `--batch-size=64` as `--batch-size`: its value is in the argument itself.
    let value = inline.or_else(|| {
        let i = args
            .iter()
            .position(|a| a == name || a.starts_with(&format!("{name}=")))?;
        match args[i].split_once('=') {
            Some((_, v)) => Some(v.to_string()),
            None => args.get(i + 1).filter(|v| !v.starts_with("--")).cloned(),
        }
    });
    let pair = vae::config::set_pair(name, Some(value.as_deref().unwrap_or("VALUE")))?;
    // Brackets, quotes and spaces need quoting in bash and zsh alike.
    let quoted = if pair.chars().any(|c| "[]{}\"' *?~$;&|<>()#!".contains(c)) {
        format!("'{pair}'")
    } else {
        pair
    };
    Some(format!(
        "tip: config keys are set with --set, e.g. vae train --set {quoted}"
    ))
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
                _ => {
                    let args: Vec<String> = std::env::args().collect();
                    let mut line = usage_line(&e.to_string());
                    if let Some(tip) = set_tip(&e, &args) {
                        line = line.replace(" (see vae --help)", &format!("; {tip}"));
                    }
                    eprintln!("{line}");
                    std::process::exit(2);
                }
            }
        }
    };
    vae::device::init_cpu_threads();
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {}", error_line(&e));
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train {
            config,
            mut set,
            run,
            device,
            quiet,
            resume,
        } => {
            if let Some(d) = device {
                set.push(format!("device={d}"));
            }
            if resume {
                let run = run.map(|p| p.display().to_string());
                train::resume(run.as_deref(), &set, &train::Options { run: None, quiet })?;
            } else {
                let name = config.unwrap_or_else(|| "mnist.toml".into());
                let cfg = config::resolve(&config::find(&name)?, &set)?;
                train::train(&cfg, &train::Options { run, quiet })?;
            }
        }
        Cmd::Eval {
            run,
            device,
            json,
            iw,
            limit,
        } => eval::run_eval(run.as_deref(), device.as_deref(), json, iw, limit)?,
        Cmd::Sample {
            n,
            seed,
            temperature,
            draw,
            pic,
        } => {
            let (l, c) = picture_run(&pic, "sample.png")?;
            pictures::sample(&l, n, seed, temperature, draw, &c)?;
        }
        Cmd::Manifold {
            dim,
            steps,
            axes,
            pic,
        } => {
            let (l, c) = picture_run(&pic, "manifold.png")?;
            pictures::manifold(&l, dim, steps, axes, &c)?;
        }
        Cmd::Reconstruct {
            n,
            index,
            cols,
            pic,
        } => {
            let idx = match index {
                Some(Indices(v)) => v,
                None => (0..n).collect(),
            };
            let (l, c) = picture_run(&pic, "reconstruction.png")?;
            pictures::reconstruct(&l, &idx, cols, &c)?;
        }
        Cmd::Interpolate {
            from,
            to,
            steps,
            slerp,
            pic,
        } => {
            let (l, c) = picture_run(&pic, "interpolation.png")?;
            pictures::interpolate(&l, from, to, steps, slerp, &c)?;
        }
        Cmd::Curves { pic } => {
            let (l, c) = picture_run(&pic, pictures::CURVES_FILE)?;
            pictures::curves(&l.dir, &c)?;
        }
        Cmd::Explore {
            limit,
            precision,
            run,
            output,
        } => {
            let pic = PicArgs {
                run,
                output,
                scale: 1,
                device: Some("cpu".into()),
            };
            let (l, c) = picture_run(&pic, "explore.html")?;
            vae::explore::explore(&l, limit, precision, &c.output)?;
        }
        Cmd::Encode {
            run,
            data,
            split,
            output,
            device,
        } => {
            let file = match split {
                vae::codes::Which::Test => "codes-test.npz",
                vae::codes::Which::Train => "codes-train.npz",
            };
            let pic = PicArgs {
                run,
                output,
                scale: 1,
                device,
            };
            let (l, c) = picture_run(&pic, file)?;
            vae::codes::encode(&l, data.as_deref(), split, &c.output)?;
        }
        Cmd::Decode { codes, cols, pic } => {
            let (l, c) = picture_run(&pic, "decoded.png")?;
            vae::codes::decode(&l, &codes, &c.output, cols, c.scale)?;
        }
        Cmd::Scatter { limit, pic } => {
            let (l, c) = picture_run(&pic, "scatter.png")?;
            pictures::scatter(&l, limit, &c)?;
        }
    }
    Ok(())
}

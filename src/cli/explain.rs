//! `vicinity explain`: explanation maps of images (or of an ImageFolder's first images) as PNG
//! overlays, sheets and raw safetensors ([`crate::explain`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use image::{Rgb, RgbImage};

use crate::data::Normalize;
use crate::explain::render;
use crate::explain::{self, CamKind, Method, Named, Query};
use crate::train::inference::{CheckpointInput, class_names, input_batch};
use crate::weights::write_atomic;

/// `vicinity explain`.
#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// Image files (JPEG/PNG); or give --data.
    pub images: Vec<PathBuf>,
    /// An ImageFolder (folder or archive) to take images from instead: the first image of each
    /// class in turn, up to --limit, and a contact sheet of them all.
    #[arg(long, conflicts_with = "images")]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Images taken from --data.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Native .safetensors (carries its config) or official .pth (needs --model). Several
    /// (comma-separated or repeated; e.g. VVT-Tiny with each attention kind) are compared on one
    /// sheet, a row per image and model.
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    pub weights: Vec<PathBuf>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value = "gradcam")]
    pub method: Method,
    /// Only this stage (1-based), one PNG per map; default: every stage on one sheet.
    #[arg(long)]
    pub stage: Option<usize>,
    /// Class to explain (gradcam; default: each image's predicted class).
    #[arg(long)]
    pub class: Option<usize>,
    /// Query point `X,Y` in pixels of the model's input (locality, attention; default: the centre).
    #[arg(long, value_parser = parse_point)]
    pub query: Option<(f32, f32)>,
    /// Class names (as for predict).
    #[arg(long)]
    pub classes: Option<String>,
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long)]
    pub normalize: Option<String>,
    /// Output folder.
    #[arg(long, short)]
    pub out: PathBuf,
}

fn parse_point(s: &str) -> Result<(f32, f32), String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [x, y] = parts[..] else {
        return Err(format!("expected X,Y (two numbers), got {s:?}"));
    };
    let num = |v: &str| {
        v.trim()
            .parse::<f32>()
            .map_err(|_| format!("{v:?} is not a number"))
    };
    Ok((num(x)?, num(y)?))
}

/// One image to explain: its name in file names, and its pixels.
struct Item {
    stem: String,
    image: RgbImage,
}

fn items(args: &ExplainArgs) -> Result<Vec<Item>> {
    let mut items = named_items(args)?;
    // Images of one name from different folders get a number, so no file replaces another.
    let mut used = std::collections::HashSet::new();
    for item in &mut items {
        let mut stem = item.stem.clone();
        let mut n = 1;
        while !used.insert(stem.clone()) {
            n += 1;
            stem = format!("{}-{n}", item.stem);
        }
        item.stem = stem;
    }
    Ok(items)
}

fn named_items(args: &ExplainArgs) -> Result<Vec<Item>> {
    if let Some(data) = &args.data {
        if args.limit == 0 {
            bail!("--limit 0 takes no image; give at least 1");
        }
        let split = crate::data::open_split(data, &args.split)?;
        if split.is_empty() {
            bail!("{} has no images", split.name);
        }
        // Round-robin over the classes: the first image of each, then the second, ...
        let classes = split.num_classes().max(1);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
        for (i, s) in split.samples.iter().enumerate() {
            by_class[s.label.min(classes - 1)].push(i);
        }
        let mut picked: Vec<usize> = Vec::new();
        for round in 0.. {
            let before = picked.len();
            picked.extend(by_class.iter().filter_map(|c: &Vec<usize>| c.get(round).copied()));
            if picked.len() >= args.limit || picked.len() == before {
                break;
            }
        }
        picked.truncate(args.limit);
        return picked
            .into_iter()
            .map(|i| {
                let s = &split.samples[i];
                let class = split.classes.get(s.label).map_or("unknown", |c| c.as_str());
                Ok(Item {
                    stem: format!("{i:05}-{}", sanitize(class)),
                    image: s.decode()?,
                })
            })
            .collect();
    }
    if args.images.is_empty() {
        bail!("name image files to explain, or --data DIR for a dataset's first images");
    }
    args.images
        .iter()
        .map(|p| {
            let stem = p
                .file_stem()
                .map_or("image".into(), |s| sanitize(&s.to_string_lossy()));
            Ok(Item {
                stem,
                image: crate::data::read_image(p)?,
            })
        })
        .collect()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The normalised input back as the picture the model saw.
fn seen(x: &[f32], res: usize, norm: Normalize) -> RgbImage {
    let plane = res * res;
    RgbImage::from_fn(res as u32, res as u32, |c, r| {
        let i = r as usize * res + c as usize;
        Rgb(std::array::from_fn(|k| {
            ((x[k * plane + i] * norm.std[k] + norm.mean[k]) * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        }))
    })
}

/// A white cross at `(x, y)` of `img` (the query of attention maps).
fn mark(img: &mut RgbImage, (x, y): (u32, u32)) {
    let (w, h) = img.dimensions();
    for d in -4i64..=4 {
        for (px, py) in [(x as i64 + d, y as i64), (x as i64, y as i64 + d)] {
            if (0..w as i64).contains(&px) && (0..h as i64).contains(&py) {
                img.put_pixel(px as u32, py as u32, Rgb([255, 255, 255]));
            }
        }
    }
}

/// Writes the raw maps of one image as `f32` tensors (`rows×cols`), with `meta` as metadata.
fn write_maps(path: &Path, maps: &[Named], meta: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, [usize; 2])> = maps
        .iter()
        .map(|m| {
            let raw = m.map.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (m.name.clone(), raw, [m.map.rows, m.map.cols])
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), raw)?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, &Some(meta))?;
    write_atomic(path, &data)
}

fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// Pixels of the longer side that pictures are enlarged to (CIFAR's 32² would be unreadable).
const DISPLAY: u32 = 160;

/// `vicinity explain` on backend `B` (autodiff: Grad-CAM needs gradients).
pub fn explain_command<B: AutodiffBackend>(args: &ExplainArgs, device: &B::Device) -> Result<()> {
    let items = items(args)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut contact = Vec::new();
    let labels: Vec<String> = args.weights.iter().map(|w| weights_label(w)).collect();
    if let Some(dup) = labels
        .iter()
        .enumerate()
        .find_map(|(i, l)| labels[..i].contains(l).then_some(l))
    {
        bail!("two --weights would write files named {dup}; give weights of distinct names");
    }
    for (weights, label) in args.weights.iter().zip(&labels) {
        let label = (args.weights.len() > 1).then_some(label.as_str());
        let rows = explain_weights::<B>(args, weights, label, &items, device)
            .with_context(|| format!("explaining with {}", weights.display()))?;
        contact.extend(rows);
    }
    let method = method_name(args.method);
    if contact.len() > 1 {
        let path = args.out.join(format!("sheet-{method}.png"));
        write_atomic(&path, &png(&render::sheet(&contact))?)?;
        println!("contact sheet: {}", path.display());
    }
    println!(
        "{} image(s) explained ({method}) in {}",
        items.len(),
        args.out.display()
    );
    Ok(())
}

/// A short name for weights in file names and captions: `RUN-last` for
/// `RUN/last/model.safetensors` (`RUN-best-ema` for `RUN/best/ema.safetensors`), else the file's
/// stem.
fn weights_label(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map_or(String::new(), |s| s.to_string_lossy().into_owned());
    let run = path.parent().and_then(Path::parent).and_then(Path::file_name);
    let checkpoint = path.parent().and_then(Path::file_name);
    match (stem.as_str(), run, checkpoint) {
        ("model" | "ema", Some(run), Some(checkpoint)) => {
            let ema = if stem == "ema" { "-ema" } else { "" };
            sanitize(&format!(
                "{}-{}{ema}",
                run.to_string_lossy(),
                checkpoint.to_string_lossy()
            ))
        }
        _ => sanitize(&stem),
    }
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::Gradcam => "gradcam",
        Method::GradcamPlusPlus => "gradcampp",
        Method::Locality => "locality",
        Method::Variants => "variants",
        Method::Attention => "attention",
    }
}

/// The maps of every item with one set of weights: files written, sheet rows returned.
fn explain_weights<B: AutodiffBackend>(
    args: &ExplainArgs,
    weights: &Path,
    label: Option<&str>,
    items: &[Item],
    device: &B::Device,
) -> Result<Vec<Vec<(String, RgbImage)>>> {
    let checkpoint = CheckpointInput {
        weights: weights.to_path_buf(),
        model: args.model.clone(),
        resolution: args.resolution,
        normalize: args.normalize.clone(),
    };
    let loaded = checkpoint.load::<B>(device)?;
    let (model, res, norm) = (&loaded.model, loaded.res, loaded.norm);
    let stages = loaded.config.num_stages();
    if let Some(s) = args.stage
        && !(1..=stages).contains(&s)
    {
        bail!("--stage {s}: this model has stages 1 to {stages}");
    }
    let k = loaded.config.num_classes();
    let (names, _) = class_names(k, args.classes.as_deref(), loaded.state.as_ref())?;
    let query: Query = match args.query {
        Some((x, y)) => {
            if !(0.0..res as f32).contains(&x) || !(0.0..res as f32).contains(&y) {
                bail!("--query {x},{y} lies outside the {res}x{res} input");
            }
            (x / res as f32, y / res as f32)
        }
        None => (0.5, 0.5),
    };
    let method_name = method_name(args.method);
    let mut sheet_rows = Vec::new();
    for item in items {
        let stem = match label {
            Some(label) => format!("{}-{label}", item.stem),
            None => item.stem.clone(),
        };
        let x: Tensor<B, 4> = input_batch::<B>(vec![item.image.clone()], norm, res, device);
        let pixels = x
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 data");
        let input = render::enlarge(&seen(&pixels, res, norm), DISPLAY);
        let mut meta = HashMap::from([
            ("method".to_string(), method_name.to_string()),
            ("resolution".to_string(), res.to_string()),
        ]);
        let mut caption = stem.clone();
        let mut variants = None;
        let maps = match args.method {
            Method::Gradcam | Method::GradcamPlusPlus => {
                let kind = match args.method {
                    Method::Gradcam => CamKind::GradCam,
                    _ => CamKind::GradCamPlusPlus,
                };
                let (mut per_image, classes) = explain::gradcam_maps(model, x, args.class, kind)?;
                let class = classes[0];
                meta.insert("class".into(), class.to_string());
                meta.insert("class_name".into(), names[class].clone());
                caption = format!("{stem}: {}", names[class]);
                println!("{stem}: explaining class {class} ({})", names[class]);
                per_image.remove(0)
            }
            Method::Locality | Method::Attention => {
                meta.insert("query".into(), format!("{},{}", query.0, query.1));
                if args.method == Method::Locality {
                    explain::locality_maps(model, x, query, args.stage)?
                } else {
                    explain::attention_maps(model, x, query, args.stage)?
                }
            }
            Method::Variants => {
                let (maps, by_variant) = explain::variant_maps(model, x)?;
                let share: Vec<String> = by_variant
                    .iter()
                    .map(|w| format!("{:.3}", w.iter().sum::<f32>() / w.len().max(1) as f32))
                    .collect();
                println!("{stem}: mean weight of each variant: {}", share.join(" "));
                meta.insert("mean_weight_per_variant".into(), share.join(","));
                variants = Some(by_variant.len());
                maps
            }
        };
        let maps: Vec<Named> = maps
            .into_iter()
            .filter(|m| args.stage.is_none_or(|s| m.stage == s))
            .collect();
        if maps.is_empty() {
            match args.stage {
                Some(s) => {
                    bail!("{method_name} draws no map of stage {s} (LSAGT's variant maps belong to stage 1)")
                }
                None => bail!("{method_name} drew no map for {stem}"),
            }
        }
        write_maps(
            &args.out.join(format!("{stem}-{method_name}.safetensors")),
            &maps,
            meta,
        )?;
        let (w, h) = input.dimensions();
        let query_px = ((query.0 * w as f32) as u32, (query.1 * h as f32) as u32);
        let mut pictures = Vec::new();
        for m in &maps {
            let mut pic = match m.name.as_str() {
                "winner" => render::categories(&input, &m.map),
                _ => render::overlay(&input, &m.map),
            };
            if matches!(args.method, Method::Locality | Method::Attention) {
                mark(&mut pic, query_px);
            }
            if args.stage.is_some() {
                let file = format!("{stem}-{method_name}-{}.png", m.name);
                write_atomic(&args.out.join(file), &png(&pic)?)?;
            }
            pictures.push((m.stage, m.name.clone(), pic));
            if let (Some(count), "winner") = (variants, m.name.as_str()) {
                pictures.push((m.stage, "variant key".into(), render::legend(count, w.max(h))));
            }
        }
        // Grad-CAM: the stages side by side; attention rows: a row per stage (one map per head).
        let mut rows: Vec<Vec<(String, RgbImage)>> = Vec::new();
        let per_stage = matches!(args.method, Method::Locality | Method::Attention);
        let mut row_stage = None;
        for (stage, name, pic) in pictures {
            if rows.is_empty() || (per_stage && row_stage != Some(stage)) {
                rows.push(vec![(caption.clone(), input.clone())]);
                row_stage = Some(stage);
            }
            rows.last_mut().expect("a row").push((name, pic));
        }
        write_atomic(
            &args.out.join(format!("{stem}-{method_name}.png")),
            &png(&render::sheet(&rows))?,
        )?;
        sheet_rows.extend(rows);
    }
    Ok(sheet_rows)
}

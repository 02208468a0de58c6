//! Weights: the authors' PyTorch checkpoints (`.pth`) and vicinity's own safetensors files.
//!
//! Official checkpoints are loaded strictly: every official tensor must land somewhere in the model
//! and every model parameter must be filled, otherwise the error lists what is unused or missing.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn_store::{ApplyResult, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot};

use crate::models::{Model, ModelConfig};

/// Metadata key under which native files keep the model configuration (JSON).
pub const CONFIG_METADATA_KEY: &str = "vicinity.config";

pub mod pth;

/// Reads every tensor of a PyTorch checkpoint (strictly: [`pth`]), unwrapping the usual `model` /
/// `state_dict` containers and the `module.` prefix that DataParallel adds.
pub fn read_pytorch(path: &Path) -> Result<Vec<(String, pth::PthTensor)>> {
    if !path.exists() {
        bail!("checkpoint {} does not exist", path.display());
    }
    pth::read(path)
}

/// A host tensor as a snapshot named by its module path, ready for `apply`. Only f32 data is
/// ever handed to Burn: a wrong dtype would panic inside `apply`, which cannot unwind safely.
/// Non-finite values are refused: such weights only ever give NaN predictions.
fn snapshot(path: &str, shape: Vec<usize>, values: Vec<f32>) -> Result<TensorSnapshot> {
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    ensure!(
        bad == 0,
        "tensor '{path}' holds {bad} NaN or infinite values of {}: the weights are damaged (a diverged run?)",
        values.len()
    );
    Ok(TensorSnapshot::from_data(
        TensorData::new(values, shape),
        path.split('.').map(str::to_string).collect(),
        vec![],
        burn::module::ParamId::new(),
    ))
}

/// Loads an official checkpoint into `module`, renaming each official name with `rename`
/// (official name → this crate's module path).
pub fn load_official<B, M>(module: M, path: &Path, rename: impl Fn(&str) -> String) -> Result<M>
where
    B: Backend,
    M: ModuleSnapshot<B>,
{
    load_official_tensors(module, read_pytorch(path)?, path, rename)
}

/// [`load_official`] of tensors already read from `path` (and possibly completed by the caller).
pub fn load_official_tensors<B, M>(
    mut module: M,
    tensors: Vec<(String, pth::PthTensor)>,
    path: &Path,
    rename: impl Fn(&str) -> String,
) -> Result<M>
where
    B: Backend,
    M: ModuleSnapshot<B>,
{
    // Norm layers name their parameters gamma/beta in Burn and weight/bias in PyTorch.
    // Enum modules (a block's attention kind) add no level to the paths.
    let ours: std::collections::HashSet<String> = module
        .collect(None, None, true)
        .iter()
        .map(|s| s.full_path())
        .collect();
    let to_norm_name = |p: String| -> String {
        if ours.contains(&p) {
            return p;
        }
        let alt = match p.rsplit_once('.') {
            Some((stem, "weight")) => format!("{stem}.gamma"),
            Some((stem, "bias")) => format!("{stem}.beta"),
            _ => return p,
        };
        if ours.contains(&alt) { alt } else { p }
    };
    let mut snapshots = Vec::with_capacity(tensors.len());
    let mut official_of = HashMap::new();
    for (name, tensor) in tensors {
        let ours = to_norm_name(rename(&name));
        let snap = snapshot(&ours, tensor.shape, tensor.values)
            .with_context(|| format!("{}: official tensor '{name}'", path.display()))?;
        snapshots.push(snap);
        official_of.insert(ours, name);
    }
    let result = module.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    check_apply(&result, &path.display().to_string(), |p| {
        official_of.get(p).cloned().unwrap_or_else(|| p.to_string())
    })?;
    Ok(module)
}

/// Turns an incomplete or inconsistent load into an error that lists the offending names, by
/// the model's parameter paths (an official name follows in parentheses where it differs), a
/// dozen of each kind at most.
fn check_apply(result: &ApplyResult, source: &str, official: impl Fn(&str) -> String) -> Result<()> {
    const SHOWN: usize = 12;
    fn list(mut lines: Vec<String>) -> String {
        lines.sort();
        let more = lines.len().saturating_sub(SHOWN);
        lines.truncate(SHOWN);
        if more > 0 {
            lines.push(format!("... and {more} more"));
        }
        format!("  {}", lines.join("\n  "))
    }
    let named = |p: &str| match official(p) {
        o if o != p => format!("{p} ({o})"),
        _ => p.to_string(),
    };
    let mut problems = Vec::new();
    if !result.errors.is_empty() {
        let lines = result
            .errors
            .iter()
            .map(|e| match e {
                burn_store::ApplyError::ShapeMismatch {
                    path,
                    expected,
                    found,
                } => format!(
                    "{}: the checkpoint has shape {:?}, the model needs {:?}",
                    named(path),
                    found.as_slice(),
                    expected.as_slice()
                ),
                burn_store::ApplyError::DTypeMismatch {
                    path,
                    expected,
                    found,
                } => {
                    format!(
                        "{}: the checkpoint has {found:?}, the model needs {expected:?}",
                        named(path)
                    )
                }
                burn_store::ApplyError::AdapterError { path, message }
                | burn_store::ApplyError::LoadError { path, message } => {
                    format!("{}: {message}", named(path))
                }
            })
            .collect();
        problems.push(format!(
            "{} tensors that do not fit:\n{}",
            result.errors.len(),
            list(lines)
        ));
    }
    if !result.unused.is_empty() {
        let lines = result.unused.iter().map(|p| named(p)).collect();
        problems.push(format!(
            "{} tensors in the checkpoint that the model has no place for:\n{}",
            result.unused.len(),
            list(lines)
        ));
    }
    if !result.missing.is_empty() {
        let lines = result.missing.iter().map(|(p, _)| p.clone()).collect();
        problems.push(format!(
            "{} model parameters the checkpoint does not provide:\n{}",
            result.missing.len(),
            list(lines)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "{source} does not match the model configuration (is it the right model name/config?)\n{}",
            problems.join("\n")
        )
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves a torn
/// file and an existing file is only replaced by a complete one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "cannot write {} ({e}); is the disk full or the folder read-only? Nothing was replaced",
            path.display()
        );
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move the new file to {}", path.display()))
}

/// Saves a model as safetensors with its configuration in the metadata.
pub fn save_native<B: Backend>(model: &Model<B>, config: &ModelConfig, path: &Path) -> Result<()> {
    write_atomic(path, &native_bytes(model, config)?)
}

/// The bytes [`save_native`] writes, so that they can be written elsewhere (a background thread).
pub fn native_bytes<B: Backend>(model: &Model<B>, config: &ModelConfig) -> Result<Vec<u8>> {
    module_bytes(model, CONFIG_METADATA_KEY, &serde_json::to_string(config)?)
}

/// Any module's parameters as safetensors, with `json` (its configuration) under `key` in the
/// metadata. Enum variants add no level to the names.
pub fn module_bytes<B: Backend, M: ModuleSnapshot<B>>(module: &M, key: &str, json: &str) -> Result<Vec<u8>> {
    let mut store = SafetensorsStore::from_bytes(None)
        .skip_enum_variants(true)
        .metadata(key, json.to_string());
    module.save_into(&mut store).map_err(|e| anyhow::anyhow!("{e}"))?;
    store.get_bytes().map_err(|e| anyhow::anyhow!("{e}"))
}

/// What [`native_bytes`] writes, from f32 host tensors named and shaped like the model's
/// parameters (the trainer's copy of the weights, read back in one piece per buffer rather than
/// one device read per parameter).
pub fn native_bytes_from_host(
    tensors: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    config: &ModelConfig,
) -> Result<Vec<u8>> {
    let mut metadata = SafetensorsStore::default_metadata();
    metadata.insert(CONFIG_METADATA_KEY.to_string(), serde_json::to_string(config)?);
    crate::io::safetensors_bytes(tensors, Some(metadata.into_iter().collect()))
}

/// The configuration stored in a native weights file, if any.
pub fn native_config(path: &Path) -> Result<Option<ModelConfig>> {
    let Some(json) = metadata_entry(path, CONFIG_METADATA_KEY)? else {
        return Ok(None);
    };
    Ok(Some(serde_json::from_str(&json).with_context(|| {
        format!("{} carries an unreadable model config", path.display())
    })?))
}

/// Loads native safetensors weights saved by [`save_native`].
pub fn load_native<B: Backend>(model: Model<B>, path: &Path) -> Result<Model<B>> {
    if !path.exists() {
        bail!("weights file {} does not exist", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    load_native_bytes(model, bytes, &path.display().to_string())
}

/// [`load_native`] from the bytes of such a file (`source` names them in errors). Floating-point
/// tensors of any width are read as f32; any other dtype is refused by name.
pub fn load_native_bytes<B: Backend>(model: Model<B>, bytes: Vec<u8>, source: &str) -> Result<Model<B>> {
    load_module_bytes(model, bytes, source)
}

/// [`load_native_bytes`] for any module: every tensor of the file must land in `module` and every
/// parameter of `module` must be filled.
pub fn load_module_bytes<B: Backend, M: ModuleSnapshot<B>>(
    mut module: M,
    bytes: Vec<u8>,
    source: &str,
) -> Result<M> {
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{source} is not a readable safetensors file: {e}"))?;
    let mut snapshots = Vec::new();
    for (name, view) in file.tensors() {
        let values = crate::io::floats(&view).with_context(|| format!("{source}: tensor '{name}'"))?;
        snapshots
            .push(snapshot(&current_name(&name), view.shape().to_vec(), values).context(source.to_string())?);
    }
    let result = module.apply(snapshots, None, None, true);
    check_apply(&result, source, str::to_string)?;
    Ok(module)
}

/// The metadata entry `key` of a safetensors file, if it has one.
pub fn metadata_entry(path: &Path, key: &str) -> Result<Option<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
    Ok(meta.metadata().as_ref().and_then(|m| m.get(key)).cloned())
}

/// LSAGT blocks kept their attention under `local` / `global` before it became `attn`: the
/// pattern and replacement that bring such a name up to date (`stages.0.blocks.0.local.wq.weight`
/// → `stages.0.blocks.0.attn.wq.weight`; a prefix such as the optimizer's `m/` is kept). Native
/// weights and optimizer state are renamed by [`current_name`].
const LEGACY_ATTN: (&str, &str) = (r"^(.*\.blocks\.\d+)\.(local|global)\.", "$1.attn.");

/// A parameter name as this version writes it ([`LEGACY_ATTN`]).
pub fn current_name(name: &str) -> String {
    static RULE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let rule = RULE.get_or_init(|| regex::Regex::new(LEGACY_ATTN.0).expect("a valid pattern"));
    rule.replace(name, LEGACY_ATTN.1).into_owned()
}

/// Loads weights of either kind, chosen by extension: `.pth`/`.pt`/`.bin` are official
/// checkpoints, `.safetensors` are native files.
pub fn load_any<B: Backend>(model: Model<B>, path: &Path) -> Result<Model<B>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => load_native(model, path),
        Some("pth" | "pt" | "bin" | "tar") => match model {
            Model::Vvt(m) => Ok(Model::Vvt(load_official(
                m,
                path,
                crate::models::vvt::rename_official,
            )?)),
            Model::Lsagt(m) => Ok(Model::Lsagt(load_official(
                m,
                path,
                crate::models::lsagt::rename_official,
            )?)),
        },
        _ => bail!(
            "cannot tell the format of {}: use .pth/.pt for official PyTorch checkpoints or .safetensors for native weights",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::current_name;

    #[test]
    fn names_written_before_the_attn_field_are_brought_up_to_date() {
        assert_eq!(
            current_name("stages.0.blocks.0.local.wq.weight"),
            "stages.0.blocks.0.attn.wq.weight"
        );
        assert_eq!(
            current_name("m/stages.2.blocks.3.global.proj.bias"),
            "m/stages.2.blocks.3.attn.proj.bias"
        );
        // Only a block's attention: other fields and other models' names stay.
        for name in [
            "stages.1.blocks.0.mlp.fc1.weight",
            "stages.0.blocks.1.attn.q_proj.weight",
            "stages.0.local.weight",
            "head.bias",
        ] {
            assert_eq!(current_name(name), name);
        }
    }
}

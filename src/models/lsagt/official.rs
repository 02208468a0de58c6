//! The authors' checkpoint names → this crate's module paths (`layers.{k}.0` → `stages.{k}`,
//! `layers.{k}.1` → `stages.{k}.reduce`, `Wq_even`/`Wq_odd` → `attn.wq`, ...).

/// Official name → module path:
/// `to_patch_embedding.projections.3.bias` → `patch_embed.projections.3.bias`,
/// `layers.0.0.pos_emb` → `stages.0.variant_pos_emb` (later stages: `stages.{k}.pos_emb`),
/// `layers.0.0.layers.0.0.Wq_even.weight` → `stages.0.blocks.0.attn.wq.weight`,
/// `layers.2.0.layers.1.0.Wkv_odd.bias` → `stages.2.blocks.1.attn.wkv.bias`,
/// `layers.1.0.layers.3.1.fc2.weight` → `stages.1.blocks.3.mlp.fc2.weight`,
/// `layers.0.1.conv.weight` → `stages.0.reduce.conv.weight`, `layers.1.0.norm1.weight` →
/// `stages.1.norm1.gamma` (LayerNorm `weight`/`bias` become `gamma`/`beta`), `mlp_head.*` unchanged.
/// Unknown names are returned as they are (the loader then lists them as unused).
pub fn rename_official(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("to_patch_embedding.") {
        return format!("patch_embed.{rest}");
    }
    if let Some(rest) = name.strip_prefix("norm.") {
        return format!("norm.{}", norm_param(rest));
    }
    let parts: Vec<&str> = name.split('.').collect();
    let index = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let (Some("layers"), Some(k)) = (parts.first().copied(), index(1)) else {
        return name.to_string();
    };
    let tail = |from: usize| parts[from..].join(".");
    match (parts.get(2).copied(), parts.get(3).copied()) {
        (Some("1"), Some("norm")) => format!("stages.{k}.reduce.norm.{}", norm_param(&tail(4))),
        (Some("1"), Some(_)) => format!("stages.{k}.reduce.{}", tail(3)),
        (Some("0"), Some("pos_emb")) if parts.len() == 4 => {
            format!(
                "stages.{k}.{}",
                if k == 0 { "variant_pos_emb" } else { "pos_emb" }
            )
        }
        (Some("0"), Some(norm @ ("norm1" | "norm2"))) => {
            format!("stages.{k}.{norm}.{}", norm_param(&tail(4)))
        }
        (Some("0"), Some("layers")) => match (index(4), parts.get(5).copied(), parts.get(6).copied()) {
            (Some(j), Some("0"), Some(proj)) if parts.len() > 7 => {
                let ours = match proj {
                    "Wq_even" | "Wq_odd" => "wq",
                    "Wkv_even" | "Wkv_odd" => "wkv",
                    other => other,
                };
                format!("stages.{k}.blocks.{j}.attn.{ours}.{}", tail(7))
            }
            (Some(j), Some("1"), Some(_)) => format!("stages.{k}.blocks.{j}.mlp.{}", tail(6)),
            _ => name.to_string(),
        },
        _ => name.to_string(),
    }
}

/// LayerNorm `weight`/`bias` → Burn's `gamma`/`beta`. Done here rather than left to the
/// loader's adapter: burn-store 0.21 finds tensors through such alternative names but then still
/// reports them as unused.
fn norm_param(param: &str) -> &str {
    match param {
        "weight" => "gamma",
        "bias" => "beta",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_maps_every_kind_of_name() {
        let cases = [
            (
                "to_patch_embedding.projections.3.bias",
                "patch_embed.projections.3.bias",
            ),
            ("layers.0.0.pos_emb", "stages.0.variant_pos_emb"),
            ("layers.2.0.pos_emb", "stages.2.pos_emb"),
            ("layers.1.0.norm1.weight", "stages.1.norm1.gamma"),
            ("layers.1.0.norm2.bias", "stages.1.norm2.beta"),
            (
                "layers.0.0.layers.0.0.Wq_even.weight",
                "stages.0.blocks.0.attn.wq.weight",
            ),
            (
                "layers.0.0.layers.0.0.Wkv_even.bias",
                "stages.0.blocks.0.attn.wkv.bias",
            ),
            (
                "layers.0.0.layers.0.0.proj.weight",
                "stages.0.blocks.0.attn.proj.weight",
            ),
            (
                "layers.0.0.layers.1.0.Wq_odd.weight",
                "stages.0.blocks.1.attn.wq.weight",
            ),
            (
                "layers.3.0.layers.0.0.proj.bias",
                "stages.3.blocks.0.attn.proj.bias",
            ),
            (
                "layers.1.0.layers.3.1.fc2.weight",
                "stages.1.blocks.3.mlp.fc2.weight",
            ),
            ("layers.0.1.conv.weight", "stages.0.reduce.conv.weight"),
            ("layers.2.1.norm.bias", "stages.2.reduce.norm.beta"),
            ("norm.weight", "norm.gamma"),
            ("mlp_head.weight", "mlp_head.weight"),
            ("something.else", "something.else"),
        ];
        for (official, ours) in cases {
            assert_eq!(rename_official(official), ours, "{official}");
        }
    }
}

//! The gradient sets of public architectures, derived from their
//! definitions, for `pskv bench --model`: what a framework pushes and pulls
//! each step, tensor by tensor.
//!
//! Inception-v3 is torchvision's `inception_v3` (with its auxiliary
//! classifier, as it trains): every `BasicConv2d` is a convolution without
//! bias and a batch norm with a scale and a shift (the running statistics
//! are not gradients). 292 tensors, 27,161,264 parameters (torchvision's
//! count), 108.6 MB in float32, from 128 B to 9.8 MB.

use super::super::error::{CliError, CliResult};

/// One trainable tensor: its name and shape.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Param {
    /// torchvision's parameter name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl Param {
    /// Its elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The models `--model` takes.
pub const MODELS: &[&str] = &["inception-v3"];

/// The parameters of `name`, in the order a forward pass meets them (a
/// framework's parameter index: it pushes gradient `i` with priority `-i`).
pub fn params(name: &str) -> CliResult<Vec<Param>> {
    match name {
        "inception-v3" => Ok(inception_v3()),
        _ => Err(CliError::Usage(format!(
            "unknown model '{name}': expected one of {}",
            MODELS.join(", ")
        ))),
    }
}

/// Builds a parameter list block by block.
#[derive(Default)]
struct Net(Vec<Param>);

impl Net {
    fn param(&mut self, name: String, shape: &[usize]) {
        self.0.push(Param {
            name,
            shape: shape.to_vec(),
        });
    }

    /// A `BasicConv2d`: a `kh`x`kw` convolution from `cin` to `cout`
    /// channels, without bias, then a batch norm.
    fn conv(&mut self, name: &str, cin: usize, cout: usize, (kh, kw): (usize, usize)) {
        self.param(format!("{name}.conv.weight"), &[cout, cin, kh, kw]);
        self.param(format!("{name}.bn.weight"), &[cout]);
        self.param(format!("{name}.bn.bias"), &[cout]);
    }

    fn linear(&mut self, name: &str, cin: usize, cout: usize) {
        self.param(format!("{name}.weight"), &[cout, cin]);
        self.param(format!("{name}.bias"), &[cout]);
    }

    /// Several convolutions of block `block`: (branch, in, out, kernel).
    fn convs(&mut self, block: &str, convs: &[(&str, usize, usize, (usize, usize))]) {
        for &(branch, cin, cout, k) in convs {
            self.conv(&format!("{block}.{branch}"), cin, cout, k);
        }
    }
}

const K1: (usize, usize) = (1, 1);
const K3: (usize, usize) = (3, 3);
const K5: (usize, usize) = (5, 5);
const K17: (usize, usize) = (1, 7);
const K71: (usize, usize) = (7, 1);
const K13: (usize, usize) = (1, 3);
const K31: (usize, usize) = (3, 1);

fn inception_v3() -> Vec<Param> {
    let mut n = Net::default();
    for (name, cin, cout, k) in [
        ("Conv2d_1a_3x3", 3, 32, K3),
        ("Conv2d_2a_3x3", 32, 32, K3),
        ("Conv2d_2b_3x3", 32, 64, K3),
        ("Conv2d_3b_1x1", 64, 80, K1),
        ("Conv2d_4a_3x3", 80, 192, K3),
    ] {
        n.conv(name, cin, cout, k);
    }
    // InceptionA: 35x35, out = 224 + pool features.
    for (block, cin, pool) in [
        ("Mixed_5b", 192, 32),
        ("Mixed_5c", 256, 64),
        ("Mixed_5d", 288, 64),
    ] {
        n.convs(
            block,
            &[
                ("branch1x1", cin, 64, K1),
                ("branch5x5_1", cin, 48, K1),
                ("branch5x5_2", 48, 64, K5),
                ("branch3x3dbl_1", cin, 64, K1),
                ("branch3x3dbl_2", 64, 96, K3),
                ("branch3x3dbl_3", 96, 96, K3),
                ("branch_pool", cin, pool, K1),
            ],
        );
    }
    // InceptionB: 35x35 to 17x17, 288 to 768 channels.
    n.convs(
        "Mixed_6a",
        &[
            ("branch3x3", 288, 384, K3),
            ("branch3x3dbl_1", 288, 64, K1),
            ("branch3x3dbl_2", 64, 96, K3),
            ("branch3x3dbl_3", 96, 96, K3),
        ],
    );
    // InceptionC: factorised 7x7 convolutions, 768 channels.
    for (block, c) in [
        ("Mixed_6b", 128),
        ("Mixed_6c", 160),
        ("Mixed_6d", 160),
        ("Mixed_6e", 192),
    ] {
        n.convs(
            block,
            &[
                ("branch1x1", 768, 192, K1),
                ("branch7x7_1", 768, c, K1),
                ("branch7x7_2", c, c, K17),
                ("branch7x7_3", c, 192, K71),
                ("branch7x7dbl_1", 768, c, K1),
                ("branch7x7dbl_2", c, c, K71),
                ("branch7x7dbl_3", c, c, K17),
                ("branch7x7dbl_4", c, c, K71),
                ("branch7x7dbl_5", c, 192, K17),
                ("branch_pool", 768, 192, K1),
            ],
        );
    }
    // The auxiliary classifier, on Mixed_6e's output.
    n.convs(
        "AuxLogits",
        &[("conv0", 768, 128, K1), ("conv1", 128, 768, K5)],
    );
    n.linear("AuxLogits.fc", 768, 1000);
    // InceptionD: 17x17 to 8x8, 768 to 1280 channels.
    n.convs(
        "Mixed_7a",
        &[
            ("branch3x3_1", 768, 192, K1),
            ("branch3x3_2", 192, 320, K3),
            ("branch7x7x3_1", 768, 192, K1),
            ("branch7x7x3_2", 192, 192, K17),
            ("branch7x7x3_3", 192, 192, K71),
            ("branch7x7x3_4", 192, 192, K3),
        ],
    );
    // InceptionE: 8x8, out 2048 channels.
    for (block, cin) in [("Mixed_7b", 1280), ("Mixed_7c", 2048)] {
        n.convs(
            block,
            &[
                ("branch1x1", cin, 320, K1),
                ("branch3x3_1", cin, 384, K1),
                ("branch3x3_2a", 384, 384, K13),
                ("branch3x3_2b", 384, 384, K31),
                ("branch3x3dbl_1", cin, 448, K1),
                ("branch3x3dbl_2", 448, 384, K3),
                ("branch3x3dbl_3a", 384, 384, K13),
                ("branch3x3dbl_3b", 384, 384, K31),
                ("branch_pool", cin, 192, K1),
            ],
        );
    }
    n.linear("fc", 2048, 1000);
    n.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's `inception_v3(aux_logits=True)` has 27,161,264
    /// trainable parameters in 292 tensors; a slip in any block's channels
    /// changes the count.
    #[test]
    fn inception_v3_matches_torchvision() {
        let p = params("inception-v3").unwrap();
        assert_eq!(p.len(), 292);
        assert_eq!(p.iter().map(Param::len).sum::<usize>(), 27_161_264);
        assert_eq!(p[0].shape, vec![32, 3, 3, 3]);
        assert_eq!(p[291].name, "fc.bias");
        let mut names: Vec<&str> = p.iter().map(|x| x.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 292, "names are unique");
    }

    #[test]
    fn an_unknown_model_is_a_usage_error() {
        let e = params("resnet-50").unwrap_err().to_string();
        assert!(e.contains("inception-v3"), "{e}");
    }
}

//! The geometry of one model's paged cache.

/// The geometry of one model's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub n_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
}

impl KvLayout {
    /// Floats of one token's keys (or values) in one layer.
    pub(crate) fn row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Floats of one page's keys (or values) in one layer.
    pub(crate) fn page_floats(&self) -> usize {
        self.page_size * self.row()
    }

    /// Bytes one full-precision page takes across all layers, keys and values.
    pub fn page_bytes(&self) -> usize {
        2 * self.n_layers * self.page_floats() * std::mem::size_of::<f32>()
    }
}

impl From<KvLayout> for arbor_kernels::cube::kv::DeviceKvDims {
    /// The same geometry for the device cache.
    fn from(l: KvLayout) -> Self {
        Self {
            n_layers: l.n_layers,
            n_kv_heads: l.n_kv_heads,
            head_dim: l.head_dim,
            page_size: l.page_size,
        }
    }
}

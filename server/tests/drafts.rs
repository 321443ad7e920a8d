//! `--draft` values loaded against a real target (SmolLM2, whose tied output head is Q8_0).

use arbor_model::LoadedModel;
use arbor_server::drafts::{DraftSpec, LoadedDraft, load_drafts};
use burn::backend::Flex;

fn load(target: &LoadedModel<Flex>, spec: &str) -> (String, usize) {
    let specs = [DraftSpec::parse(spec).unwrap()];
    let mut drafts =
        load_drafts::<Flex>(target, &specs, Default::default(), &Default::default()).unwrap();
    match drafts.pop() {
        Some(LoadedDraft::Model { label, model }) => (label, model.weight_bytes()),
        _ => panic!("{spec} is a model draft"),
    }
}

/// A Q8_0 head is re-quantized to Q4_1 unless `@head=keep` (fewer bytes, and the label says
/// so); `@head=q4_1` asks for what the default does; `@q4_1` re-encodes the head too.
#[test]
fn q8_0_draft_heads_become_q4_1_unless_kept() {
    let path = arbor_tests::smollm2_path().display().to_string();
    let target = LoadedModel::<Flex>::load(&path, Default::default(), &Default::default()).unwrap();
    assert_eq!(
        target.model.head_block_type(),
        Some(arbor_kernels::quant::GgmlType::Q8_0)
    );
    let (label, bytes) = load(&target, &path);
    let (kept_label, kept) = load(&target, &format!("{path}@head=keep"));
    let (asked_label, asked) = load(&target, &format!("{path}@head=q4_1"));
    let (all_label, all) = load(&target, &format!("{path}@q4_1"));
    assert!(label.ends_with("@head=q4_1"), "{label}");
    assert!(!kept_label.contains("@head"), "{kept_label}");
    assert_eq!(asked_label, label);
    assert!(all_label.ends_with("@q4_1"), "{all_label}");
    assert_eq!(kept, target.model.weight_bytes());
    assert!(bytes < kept);
    assert_eq!(asked, bytes);
    assert_eq!(all, bytes, "SmolLM2's layers are Q4_1 already");
}

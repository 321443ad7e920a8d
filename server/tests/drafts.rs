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
    // `@exact`: SmolLM2's head would otherwise be scored in two passes by default (below).
    let (label, bytes) = load(&target, &format!("{path}@exact"));
    let (kept_label, kept) = load(&target, &format!("{path}@head=keep@exact"));
    let (asked_label, asked) = load(&target, &format!("{path}@head=q4_1@exact"));
    let (all_label, all) = load(&target, &format!("{path}@q4_1@exact"));
    assert!(label.ends_with("@head=q4_1"), "{label}");
    assert!(!kept_label.contains("@head"), "{kept_label}");
    assert_eq!(asked_label, label);
    assert!(all_label.ends_with("@q4_1"), "{all_label}");
    assert_eq!(kept, target.model.weight_bytes());
    assert!(bytes < kept);
    assert_eq!(asked, bytes);
    assert_eq!(all, bytes, "SmolLM2's layers are Q4_1 already");
}

/// A head that is a fifth of the draft's bytes or more (SmolLM2-135M: 18 of 86 MB as Q4_1) is
/// scored in two passes unless `@exact`; `@head=N` (a cut head) keeps one exact pass.
#[test]
fn big_heads_get_the_two_pass_head_by_default() {
    let path = arbor_tests::smollm2_path().display().to_string();
    let target = LoadedModel::<Flex>::load(&path, Default::default(), &Default::default()).unwrap();
    let (label, bytes) = load(&target, &path);
    let (exact_label, exact) = load(&target, &format!("{path}@exact"));
    let (asked_label, asked) = load(&target, &format!("{path}@coarse"));
    assert!(label.ends_with("@head=q4_1@coarse=256:256"), "{label}");
    assert_eq!(asked_label, label);
    assert_eq!(asked, bytes);
    assert!(!exact_label.contains("coarse"), "{exact_label}");
    assert!(bytes < exact, "{bytes} vs {exact}");
    let (cut_label, _) = load(&target, &format!("{path}@head=1024"));
    assert!(!cut_label.contains("coarse"), "{cut_label}");
}

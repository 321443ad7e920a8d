//! Tests of the tree structure and its model inputs.

use crate::{DrawKind, TokenTree, TreeError};
use arbor_model::{Architecture, ForwardInput, ModelConfig, RandomWeights, Transformer};
use std::sync::Arc;
type B = burn::backend::Flex;

fn sample_tree() -> TokenTree {
    let mut t = TokenTree::new(5);
    let a = t.push(0, 7, 0).unwrap();
    let b = t.push(0, 9, 1).unwrap();
    let c = t.push(a, 3, 0).unwrap();
    t.push(a, 4, 0).unwrap();
    t.push(b, 3, 1).unwrap();
    t.push(c, 8, 0).unwrap();
    t
}

#[test]
fn structure_paths_and_errors() {
    let t = sample_tree();
    assert_eq!(t.len(), 7);
    assert_eq!(t.children(1).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(t.path(6), vec![0, 1, 3, 6]);
    assert_eq!(t.nodes()[6].depth, 3);
    let mut t2 = t.clone();
    assert_eq!(t2.push(1, 3, 5).unwrap(), 3, "an existing child is reused");
    assert!(matches!(
        t2.push(99, 1, 0),
        Err(TreeError::NoSuchParent { parent: 99, .. })
    ));
}

#[test]
fn trie_merge_shares_equal_paths() {
    let mut t = sample_tree();
    let mut other = TokenTree::new(5);
    let x = other.push(0, 7, 2).unwrap(); // same as node 1
    other.push(x, 4, 2).unwrap(); // same as node 4
    other.push(x, 6, 2).unwrap(); // new
    let map = t.merge(&other).unwrap();
    assert_eq!(map, vec![0, 1, 4, 7]);
    assert_eq!(t.nodes()[7].draft, 2);
    assert!(matches!(
        t.merge(&TokenTree::new(6)),
        Err(TreeError::RootMismatch(5, 6))
    ));
}

/// The target's logits at every tree node equal those of running that node's path alone:
/// the mask and positions make one forward over the tree equivalent to |tree| causal runs.
#[test]
fn tree_forward_equals_each_path_run_alone() {
    let dev = Default::default();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let cfg = ModelConfig::tiny(arch);
        let model =
            Transformer::<B>::from_weights(&cfg, &mut RandomWeights::new(4, 0.3), &dev).unwrap();
        let prefix = [1u32, 2, 3, 4, 5];
        let tree = sample_tree();
        let mut cache = model.new_cache();
        model
            .forward(&ForwardInput::causal(&prefix, 0), &mut cache)
            .unwrap();
        let hidden = model
            .forward(&tree.forward_input(prefix.len()), &mut cache)
            .unwrap();
        let got = model.logits(hidden).into_data().to_vec::<f32>().unwrap();
        let v = cfg.vocab_size;
        for i in 0..tree.len() {
            let seq: Vec<u32> = prefix
                .iter()
                .copied()
                .chain(tree.path(i).iter().map(|&j| tree.nodes()[j].token))
                .collect();
            let mut c = model.new_cache();
            let alone = model
                .forward_last_logits(&ForwardInput::causal(&seq, 0), &mut c)
                .unwrap();
            let worst = alone[0]
                .iter()
                .zip(&got[i * v..(i + 1) * v])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{arch:?} node {i}: max difference {worst}");
        }
    }
}

#[test]
fn proposals_record_draws_and_survive_merge() {
    let q: Arc<[f32]> = Arc::from(vec![0.1f32, 0.2, 0.3, 0.4]);
    let mut t = TokenTree::new(0);
    let kids = t
        .propose(
            0,
            1,
            DrawKind::Iid,
            Some(q.clone()),
            &[(3, 0.4), (2, 0.3), (3, 0.4)],
        )
        .unwrap();
    assert_eq!(kids, vec![1, 2, 1], "a repeated iid draw shares its node");
    assert!((t.nodes()[2].score - 0.3).abs() < 1e-6);
    assert!(matches!(
        t.propose(0, 1, DrawKind::WithoutReplacement, None, &[(1, 0.2)]),
        Err(TreeError::MissingDistribution(..))
    ));
    let mut other = TokenTree::new(0);
    other.push(0, 2, 7).unwrap();
    let map = t.merge(&other).unwrap();
    assert_eq!(map, vec![0, 2]);
    let at_root: Vec<_> = t
        .proposals_at(0)
        .map(|p| (p.draft, p.draws.clone()))
        .collect();
    assert_eq!(at_root, vec![(1, vec![1, 2, 1]), (7, vec![2])]);
}

#[test]
fn prune_keeps_draw_prefixes_and_best_scores() {
    let det = DrawKind::Deterministic;
    let mut t = TokenTree::new(0);
    // Picked in the order 3 (0.4), 2 (0.5): 3 may not be dropped before 2.
    let kids = t.propose(0, 0, det, None, &[(3, 0.4), (2, 0.5)]).unwrap();
    t.propose(kids[0], 0, det, None, &[(1, 0.05)]).unwrap();
    t.propose(kids[1], 0, det, None, &[(2, 0.5), (3, 0.4)])
        .unwrap();
    assert_eq!(t.len(), 6);
    let map = t.prune(3);
    assert_eq!(t.len(), 3);
    // Kept: root, 3 (first pick), 2 (second) — the deeper nodes scored lower.
    assert_eq!(map[..3], [Some(0), Some(1), Some(2)]);
    assert_eq!(t.proposals().len(), 1);
    let map = t.prune(2);
    assert_eq!(
        map,
        vec![Some(0), Some(1), None],
        "the last pick goes first"
    );
    assert_eq!(t.proposals()[0].draws, vec![1]);
}

#[test]
fn prune_never_drops_sampled_children() {
    let q: Arc<[f32]> = Arc::from(vec![0.05f32, 0.05, 0.5, 0.4]);
    let mut t = TokenTree::new(0);
    t.propose(
        0,
        0,
        DrawKind::WithoutReplacement,
        Some(q),
        &[(3, 0.4), (1, 0.05)],
    )
    .unwrap();
    t.push(0, 2, 1).unwrap();
    let map = t.prune(1);
    assert_eq!(map, vec![Some(0), Some(1), Some(2), None]);
}

#[test]
fn level_inputs_see_fed_ancestors() {
    let t = sample_tree();
    // A draft with 4 committed rows, the root being row 3, feeds level 1 then level 2.
    let lvl1 = t.forward_input_for(&[1, 2], 4, 4, &[Some(3)], 3);
    assert_eq!(lvl1.positions, vec![4, 4]);
    assert_eq!(&lvl1.mask[..6], &[true, true, true, true, true, false]);
    let rows = vec![Some(3), Some(4), Some(5)];
    let lvl2 = t.forward_input_for(&[3, 4, 5], 4, 6, &rows, 3);
    assert_eq!(lvl2.positions, vec![5, 5, 5]);
    // Node 5 (child of 2) sees the prefix, node 2's row 5 and itself (row 8).
    let r = &lvl2.mask[2 * 9..3 * 9];
    assert_eq!(
        r,
        &[true, true, true, true, false, true, false, false, true]
    );
}

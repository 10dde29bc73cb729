"""nn.Modules on the ops: attention (mha), MLPs, norms, rotary, blocks, embeddings."""

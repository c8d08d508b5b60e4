# src/defectvad/engine/one_pass_trainer.py
from defectvad.engine.base_trainer import BaseTrainer


class OnePassTrainer(BaseTrainer):
    # models that learn nothing by gradient: one epoch collects features, its end fits the statistics
    trainer_arguments = {"max_epochs": 1}

    def training_step(self, batch, batch_idx):
        self.model(batch["image"])
        return None

    def on_train_epoch_end(self):
        self.model.fit()

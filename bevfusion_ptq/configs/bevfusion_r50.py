# BEVFusion, ResNet50 camera backbone + sparse lidar encoder, ConvFuser, TransFusion head:
# the reference (CUDA-BEVFusion / mit-han-lab bevfusion db75150) hyperparameters.
# OpenMMLab Python config: `model` is built through mmdet3d's MODELS registry, `data`
# describes the inputs the model expects. Axis conventions: voxel_size, sparse_shape and
# encoder_paddings are (x, y, z); BEV maps are [B, C, X, Y].

point_cloud_range = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
voxel_size = [0.075, 0.075, 0.2]
image_size = [256, 704]
out_size_factor = 8

model = dict(
    type="BEVFusion",
    encoders=dict(
        camera=dict(
            backbone=dict(
                type="mmdet.ResNet",
                depth=50,
                num_stages=4,
                out_indices=(1, 2, 3),
                style="pytorch",
                norm_cfg=dict(type="BN", requires_grad=True),
                norm_eval=False,
                frozen_stages=-1,
                zero_init_residual=False,
            ),
            neck=dict(
                type="GeneralizedLSSFPN",
                in_channels=[512, 1024, 2048],
                out_channels=256,
                norm_cfg=dict(type="BN2d"),
                act_cfg=dict(type="ReLU", inplace=True),
                upsample_cfg=dict(mode="bilinear", align_corners=False),
            ),
            vtransform=dict(
                type="DepthLSSTransform",
                in_channels=256,
                out_channels=80,
                image_size=image_size,
                feature_size=[image_size[0] // 8, image_size[1] // 8],
                xbound=[-54.0, 54.0, 0.3],
                ybound=[-54.0, 54.0, 0.3],
                zbound=[-10.0, 10.0, 20.0],
                dbound=[1.0, 60.0, 0.5],
                downsample=2,
                dtransform_channels=[8, 32, 64],
            ),
        ),
        lidar=dict(
            voxelize=dict(
                type="HardVoxelize",
                voxel_size=voxel_size,
                point_cloud_range=point_cloud_range,
                max_num_points=10,
                max_voxels=[120000, 160000],
            ),
            backbone=dict(
                type="BEVSparseEncoder",
                in_channels=5,
                sparse_shape=[1440, 1440, 41],
                output_channels=128,
                order=("conv", "norm", "act"),
                norm_cfg=dict(type="BN1d", eps=1e-3, momentum=0.01),
                encoder_channels=[[16, 16, 32], [32, 32, 64], [64, 64, 128], [128, 128]],
                encoder_paddings=[[0, 0, 1], [0, 0, 1], [0, 0, [1, 1, 0]], [0, 0]],
                block_type="basicblock",
                conv_out_kernel=[1, 1, 3],
                conv_out_stride=[1, 1, 2],
            ),
        ),
    ),
    fuser=dict(type="ConvFuser", in_channels=[80, 256], out_channels=256),
    decoder=dict(
        backbone=dict(
            type="SECOND",
            in_channels=256,
            out_channels=[128, 256],
            layer_nums=[5, 5],
            layer_strides=[1, 2],
            norm_cfg=dict(type="BN", eps=1e-3, momentum=0.01),
            conv_cfg=dict(type="Conv2d", bias=False),
        ),
        neck=dict(
            type="SECONDFPN",
            in_channels=[128, 256],
            out_channels=[256, 256],
            upsample_strides=[1, 2],
            norm_cfg=dict(type="BN", eps=1e-3, momentum=0.01),
            upsample_cfg=dict(type="deconv", bias=False),
            use_conv_for_no_stride=True,
        ),
    ),
    heads=dict(
        object=dict(
            type="TransFusionHead",
            in_channels=512,
            hidden_channel=128,
            num_classes=10,
            num_proposals=200,
            num_decoder_layers=1,
            num_heads=8,
            ffn_channel=256,
            dropout=0.1,
            activation="relu",
            nms_kernel_size=3,
            point_like_classes=[8, 9],
            common_heads=dict(center=[2, 2], height=[1, 2], dim=[3, 2], rot=[2, 2], vel=[2, 2]),
            head_conv=64,
            bbox_coder=dict(
                pc_range=point_cloud_range[:2],
                voxel_size=voxel_size[:2],
                out_size_factor=out_size_factor,
                post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0],
                score_threshold=0.0,
            ),
        )
    ),
)

class_names = [
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
]

data = dict(
    image_size=image_size,
    point_cloud_range=point_cloud_range,
    voxel_size=voxel_size,
    sweeps_num=9,
    load_dim=5,
    use_dim=5,
    img_norm=dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    test_resize=0.48,
    train_aug=dict(
        resize_lim=[0.38, 0.55],
        rot_lim=[-5.4, 5.4],
        rand_flip=True,
        global_rot=[-0.785, 0.785],
        global_scale=[0.9, 1.1],
        global_translate_std=0.5,
    ),
    class_names=class_names,
)
